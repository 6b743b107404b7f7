"""A trained run, loaded for inference: its config, its model and its preprocessing (eval and predict).

    run = load_run("runs/demo_digits")            # a run folder, a checkpoint folder or a weights file
    logits = run.model(run.preprocess([Image.open("3.png")]))

What `--checkpoint` may name:
- a run folder: its `model.safetensors` (else its newest complete checkpoint) and its `config.yaml`;
- a checkpoint folder (`.../checkpoints/step_NNNNNNNN`): consolidated in memory, config from its metadata;
- a weights file: `model.safetensors` written by the trainer or `distvit ckpt consolidate` (config in its
  metadata), or any weights file with the run's `config.yaml` beside it.
The preprocessing is the run's own eval transform (data.img_size, in_chans, eval_crop_pct,
interpolation) and normalisation (data.mean/std, else the dataset manifest's), as the trainer's val loader.
A run trained with data.packing (native resolution) is fed as its packed val loader feeds it: each image
resized to its native-resolution target size (aspect ratio kept, sides bounded by data.packing.min_side /
max_side, patch multiples; no crop), the images packed into one PackedBatch (`run.logits` takes either).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from distvit import models
from distvit.config import Config, ConfigError
from distvit.models.weights import compare_state_dict

HEAD_KEYS = ("head.weight", "head.fc.weight")


@dataclass
class LoadedRun:
    cfg: Config
    model: nn.Module
    weights: str  # where the weights came from
    classes: list[str]
    manifest: dict | None
    device: torch.device

    def preprocess(self, images):
        """PIL images -> the normalised batch the model was validated on: a (B, C, H, W) tensor, or a
        distvit.data.packing.PackedBatch (images in input order) for a data.packing run."""
        from distvit.data.loader import resolve_stats
        from distvit.data.device import DeviceNormalize, to_uint8_batch
        from distvit.data.transforms import EvalTransform

        d = self.cfg.data
        if d.packing is not None:
            return self._preprocess_packed(images)
        transform = EvalTransform(d.img_size, d.in_chans, d.eval_crop_pct, d.interpolation)
        mean, std = resolve_stats(d, self.manifest)
        mode = "L" if d.in_chans == 1 else "RGB"
        batch = to_uint8_batch([transform(img.convert(mode)) for img in images])
        return DeviceNormalize(mean, std)(batch, self.device)  # as the val loader: uint8 -> device, then normalise

    def _preprocess_packed(self, images):
        """As distvit/data/packed_loader.py's val path: decode to the run's channels, resize to
        target_size(native) with the run's interpolation (PIL), uint8 patches, packed, normalised."""
        import numpy as np

        from distvit.data.loader import resolve_stats
        from distvit.data.packed_loader import PackedNormalize, _patch
        from distvit.data.packing import pack, target_size
        from distvit.data.transforms import RESAMPLE
        from distvit.engine.packed_train import patch_size

        d, pk = self.cfg.data, self.cfg.data.packing
        p = _patch(patch_size(self.model))
        mode = "L" if d.in_chans == 1 else "RGB"
        tensors = []
        for img in images:
            img = img.convert(mode)
            h, w = target_size(img.height, img.width, p, pk.min_side, pk.max_side, "native")
            if img.size != (w, h):
                img = img.resize((w, h), RESAMPLE[d.interpolation])
            arr = np.asarray(img, dtype=np.uint8)
            tensors.append(torch.from_numpy(arr.copy()).reshape(h, w, -1).permute(2, 0, 1).contiguous())
        # Every image whole in a row: max_tokens as trained, or the largest image's patches if more.
        tokens = max(t.shape[1] // p * (t.shape[2] // p) for t in tensors)
        packed = pack(tensors, p, max(pk.max_tokens, tokens))
        return PackedNormalize(*resolve_stats(d, self.manifest), p)(packed, self.device)

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        """Logits (B, classes) of a preprocessed batch: a tensor or a PackedBatch (input order)."""
        from distvit.engine.distill import named_logits

        if self.cfg.task.kind != "classify":
            raise ConfigError(f"{self.weights}: a task.kind={self.cfg.task.kind} run predicts patches, not classes; "
                              "complete images with `distvit generate --checkpoint <run> --prompt ...` instead")
        return named_logits(self.model(batch.to(self.device)))[""]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu")
    return torch.device(name)


def _config_from(meta_config: str | dict | None, beside: Path, what: str) -> Config:
    if isinstance(meta_config, str) and meta_config.strip() not in ("", "{}"):
        meta_config = json.loads(meta_config)
    if isinstance(meta_config, dict) and meta_config:
        return Config.model_validate(meta_config)
    path = beside / "config.yaml"
    if path.is_file():
        return Config.model_validate(yaml.safe_load(path.read_text()))
    raise ConfigError(f"{what} carries no distvit config (no metadata, no {path}); pass the run folder instead "
                      "(it holds config.yaml beside model.safetensors)")


def _weights(checkpoint: str) -> tuple[dict[str, torch.Tensor], Config, str]:
    """(state dict, run config, description) for a run folder, checkpoint folder or weights file."""
    from distvit.checkpoint import io as ckio

    p = Path(checkpoint)
    if p.is_dir() and (p / ckio.META).is_file():  # one checkpoint (step_NNNNNNNN)
        from distvit.checkpoint.consolidate import consolidated_state_dict

        return consolidated_state_dict(p), _config_from(ckio.read_meta(p).config, p.parent.parent, str(p)), str(p)
    if p.is_dir():  # a run folder
        if (p / "model.safetensors").is_file():
            return _weights(str(p / "model.safetensors"))
        tag = ckio.find_resume(p / "checkpoints", log=lambda *_: None)
        if tag is None:
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no model.safetensors and no complete checkpoint in it; "
                                    "give a run folder, a checkpoint folder or a weights file")
        return _weights(str(tag))
    if not p.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such run folder or file")
    meta = None
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = (f.metadata() or {}).get("config")
    return models.load_state_dict(p), _config_from(meta, p.parent, str(p)), str(p)


def load_run(checkpoint: str, device: str = "auto", data: str | None = None) -> LoadedRun:
    """The model of a run in eval mode on `device`, with its config; `data` is the shard pattern to read class names from."""
    from distvit.data import read_manifest

    sd, cfg, source = _weights(checkpoint)
    head = next((k for k in HEAD_KEYS if k in sd), None)
    num_classes = cfg.model.num_classes or (int(sd[head].shape[0]) if head else None)
    overrides = dict(img_size=cfg.model.img_size or cfg.data.img_size, in_chans=cfg.model.in_chans or cfg.data.in_chans,
                     attn_backend=cfg.model.attn_backend, num_classes=num_classes)
    if cfg.task.kind == "autoregressive":  # a causal model: no classifier, its prefix from the task (engine/tasks.py)
        overrides.update(num_classes=None, prefix_patches=cfg.task.prefix_patches)
    model = models.create(cfg.model.name, **overrides)
    report = compare_state_dict(model, sd)
    if not report.ok:
        raise models.WeightsMismatchError(f"{source} does not fit {cfg.model.name} as its config builds it: "
                                          f"{report.describe()}", report)
    model.load_state_dict(sd)
    dev = pick_device(device)
    model = model.to(dev).float().eval()
    manifest = None
    for pattern in (data, cfg.data.val, cfg.data.train):
        if pattern:
            try:
                manifest = read_manifest(pattern)
            except Exception:  # a moved or remote dataset: class names fall back to indices
                manifest = None
            if manifest:
                break
    names = list((manifest or {}).get("classes") or [])
    classes = names if len(names) == num_classes else [str(i) for i in range(num_classes or 0)]
    return LoadedRun(cfg, model, source, classes, manifest, dev)
