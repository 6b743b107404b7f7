"""Loading weights into a model: files, foreign layouts, and a clear report of what did not fit.

    report = load_checkpoint(model, "vit_base.safetensors")            # strict: raises on any mismatch
    report = load_checkpoint(model, "timm_vit.pth", strict=False)      # loads what fits, returns the rest
    report = load_checkpoint(model, "out/model.safetensors.index.json") # sharded (`distvit ckpt consolidate`)

.pt/.pth/.bin files are read with torch.load(weights_only=True): tensors and plain containers
only, never arbitrary pickled objects. Containers from common trainers ({"state_dict": ...},
{"model": ...}, DeepSpeed's {"module": ...}) are unwrapped and the prefixes DDP ("module.")
and torch.compile ("_orig_mod.") add are stripped. A model class may define
`checkpoint_filter_fn(state_dict, model)` to adapt foreign layouts (ViT resizes the position
embedding there).

Fine-tuning: when the only misfit is the classifier (`model.default_cfg["classifier"]`, e.g. a
1000-class ImageNet file into a 10-class model), the head keeps its fresh initialisation and one
line says so; `reset_head=True` always re-initialises it, `reset_head=False` never does (strict).
"""
from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SUFFIXES = (".safetensors",) + TORCH_SUFFIXES
INDEX_SUFFIX = ".safetensors.index.json"  # Hugging Face's index of sharded safetensors
CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
REPORT_MAX_KEYS = 12  # keys listed per kind in an error; the count is always exact


class WeightsMismatchError(RuntimeError):
    """A strict load found missing, unexpected or mis-shaped keys; .report holds them all."""

    def __init__(self, message: str, report: "LoadReport"):
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, file shape, model shape)
    reset_head: list[str] = field(default_factory=list)  # classifier keys left as initialised (fine-tuning)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing (in the model, not in the file): {_some(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (in the file, not in the model): {_some(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
            parts.append(f"{len(self.mismatched)} with another shape: {_some(shapes)}")
        return "; ".join(parts) if parts else "all keys match"


def _some(items: list[str]) -> str:
    head = ", ".join(items[:REPORT_MAX_KEYS])
    return head + (f", ... ({len(items) - REPORT_MAX_KEYS} more)" if len(items) > REPORT_MAX_KEYS else "")


def sharded_index(path: Path) -> Path | None:
    """The Hugging Face index of sharded safetensors that `path` names: the index itself
    (model.safetensors.index.json), or model.safetensors when only its index exists."""
    if path.name.endswith(INDEX_SUFFIX):
        return path
    index = path.with_name(path.name + ".index.json")
    if path.suffix == ".safetensors" and not path.exists() and index.is_file():
        return index
    return None


def load_sharded(index: Path) -> dict[str, torch.Tensor]:
    """Every shard an index names (`weight_map`: tensor name -> shard file beside the index)."""
    from safetensors.torch import load_file

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"weights index {str(index)!r} is not a safetensors index ({type(exc).__name__}: {exc}); "
                         "it needs a \"weight_map\" of tensor name -> shard file") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        f = index.parent / shard
        if not f.is_file():
            raise FileNotFoundError(f"weights shard {str(f)!r} named by {str(index)!r} does not exist")
        sd.update(load_file(str(f), device="cpu"))
    missing = [k for k in weight_map if k not in sd]
    if missing:
        raise ValueError(f"weights index {str(index)!r} names {len(missing)} tensor(s) its shards lack: {_some(missing)}")
    return sd


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (or a sharded safetensors index) onto the CPU; a flat {name: tensor} dict."""
    path = Path(path)
    index = sharded_index(path)
    if index is not None:
        if not index.is_file():
            raise FileNotFoundError(f"weights index {str(index)!r} does not exist")
        return clean_state_dict(load_sharded(index), source=str(index))
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    elif suffix in TORCH_SUFFIXES:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"weights file {str(path)!r} holds Python objects besides tensors, which "
                             f"torch.load(weights_only=True) refuses for safety ({first}); re-save only the "
                             "weights, e.g. torch.save(model.state_dict(), path), or as .safetensors") from e
    else:
        raise ValueError(f"weights file {str(path)!r} has suffix {suffix or '(none)'!r}; "
                         f"supported: {', '.join(SUFFIXES)}, or a sharded {INDEX_SUFFIX}")
    return clean_state_dict(sd, source=str(path))


def clean_state_dict(sd, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Unwrap trainer containers, drop non-tensor entries, strip DDP / compile prefixes."""
    while isinstance(sd, dict):
        inner = next((sd[k] for k in CONTAINER_KEYS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict):
        raise ValueError(f"{source}: expected a dict of tensors, found {type(sd).__name__}")
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if not sd:
        raise ValueError(f"{source}: holds no tensors; is it a weights file?")
    for prefix in STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def compare_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> LoadReport:
    own = model.state_dict()
    report = LoadReport(
        missing=[k for k in own if k not in sd],
        unexpected=[k for k in sd if k not in own],
    )
    report.mismatched = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items()  # in the model's order
                         if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    return report


def head_keys(model: nn.Module) -> list[str]:
    """The classifier's state-dict keys, from the model's `default_cfg["classifier"]` (timm's convention)."""
    names = (getattr(model, "default_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return [k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)]


def _num_classes(shapes: dict[str, tuple], keys: list[str]) -> str:
    rows = [shapes[k][0] for k in keys if k.endswith("weight") and k in shapes and len(shapes[k]) >= 1]
    return str(rows[0]) if rows else "?"


def load_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True, filter_fn=None,
                    reset_head: bool | None = None) -> LoadReport:
    """Load a weights file into model (in place) and return what did not fit.

    filter_fn(state_dict, model) -> state_dict adapts foreign layouts; by default the model
    class's `checkpoint_filter_fn` when it has one.
    strict: raise WeightsMismatchError unless every key matches in name and shape; with
    strict=False the matching keys load, the others keep their values and are logged.
    reset_head: None (default) keeps the model's freshly initialised classifier when the file's
    has another number of classes and nothing else misfits; True always does (fine-tuning onto
    new classes); False loads the file's classifier or fails. The report lists the kept keys.
    """
    sd = load_state_dict(path)
    filter_fn = filter_fn or getattr(type(model), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    report = compare_state_dict(model, sd)
    head = head_keys(model)
    head_misfit = bool(head) and any(k in head for k, _, _ in report.mismatched)
    others_fit = all(k in head for k in report.missing + report.unexpected + [k for k, _, _ in report.mismatched])
    if head and (reset_head or (reset_head is None and head_misfit and others_fit)):
        file_shapes = {k: tuple(sd[k].shape) for k in head if k in sd}
        own_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in head}
        sd = {k: v for k, v in sd.items() if k not in head}
        report = compare_state_dict(model, sd)
        report.missing = [k for k in report.missing if k not in head]
        report.reset_head = head
        log.warning("%s: classifier re-initialised for %s classes (the file's has %s): %s",
                    path, _num_classes(own_shapes, head), _num_classes(file_shapes, head), ", ".join(head))
    name = type(model).__name__
    if not report.ok:
        if strict:
            fix = ("load with strict=False to keep the non-matching parameters as initialised")
            if head_misfit:
                fix = ("to fine-tune onto other classes re-initialise the classifier with reset_head=True "
                       "(config: --set model.reset_head=true), or " + fix)
            raise WeightsMismatchError(
                f"weights file {str(path)!r} does not fit {name}: {report.describe()}. Check the model name and its "
                f"overrides (num_classes, img_size, in_chans, class_token, global_pool), or {fix}", report)
        log.warning("loading %s into %s with strict=False: %s", path, name, report.describe())
    bad = {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k not in bad and k not in report.unexpected}, strict=False)
    return report


def resample_abs_pos_embed(posemb: torch.Tensor, new_grid, old_grid=None, num_prefix_tokens: int = 1,
                           interpolation: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Resize a learned position embedding (1, prefix + H*W, D) to another patch grid.

    The prefix tokens (class token) keep their embeddings; the H x W grid is interpolated in
    float32 (bicubic with antialiasing by default, as timm does, so the numbers match timm's).
    old_grid defaults to a square grid.
    """
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    n_grid = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise ValueError(f"resample_abs_pos_embed: {posemb.shape[1]} position tokens minus {num_prefix_tokens} "
                             f"prefix token(s) = {n_grid} is not a square grid; pass old_grid=(h, w)")
        old_grid = (side, side)
    old_grid = (int(old_grid[0]), int(old_grid[1]))
    if old_grid[0] * old_grid[1] != n_grid:
        raise ValueError(f"resample_abs_pos_embed: old_grid {old_grid} has {old_grid[0] * old_grid[1]} cells but the "
                         f"embedding holds {n_grid} grid tokens")
    if old_grid == new_grid:
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = posemb.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)
