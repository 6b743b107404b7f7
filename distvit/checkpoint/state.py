"""distvit's own per-rank checkpoint state, stored as data only: JSON plus safetensors.

    distvit_rank00000.json          step, epoch, best metrics, data cursor, python/numpy RNG scalars
    distvit_rank00000.safetensors   torch (and CUDA) RNG state, numpy's MT19937 key, EMA weights

Neither format can carry code, so reading them never executes anything (pickle is not involved).
python's `random.getstate()` is a tuple of ints (JSON); numpy's state is a uint32 key (a tensor)
and a few scalars; torch's RNG states are uint8 tensors.
A reshaped checkpoint (`distvit ckpt reshape`) keeps the rank-independent part in
distvit_common.{json,safetensors}: step, epoch, best, EMA, every old dp rank's data cursor (the
loader re-splits the rest of the epoch when it loads them, data/remap.py) and the RNG state the old
ranks shared (absent when they differed; docs/checkpoints.md).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from distvit.checkpoint import io as ckio

FORMAT = 1
COMMON = "distvit_common"
EMA_PREFIX = "ema."


class StateError(RuntimeError):
    pass


def rank_stem(rank: int) -> str:
    return f"distvit_rank{rank:05d}"


def files_of(stem: str) -> list[str]:
    return [f"{stem}.json", f"{stem}.safetensors"]


def rng_state(device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensors) of python, numpy, torch and (on CUDA) the device's RNG."""
    version, words, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    scalars = {"python": [version, list(words), gauss],
               "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    tensors = {"rng.numpy_key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return scalars, tensors


def set_rng_state(scalars: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    version, words, gauss = scalars["python"]
    random.setstate((version, tuple(words), gauss))
    n = scalars["numpy"]
    np.random.set_state((n["name"], tensors["rng.numpy_key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def save(tag_dir: Path, stem: str, fields: dict, tensors: dict[str, torch.Tensor]) -> None:
    """tensors first, JSON second, each atomic (the COMPLETE marker, written later, covers the pair)."""
    from distvit.checkpoint.consolidate import save_safetensors

    tag_dir = Path(tag_dir)
    save_safetensors(tensors, tag_dir / f"{stem}.safetensors", metadata={"format": "pt"})
    ckio.atomic_write_text(tag_dir / f"{stem}.json", json.dumps({"format": FORMAT, **fields}, indent=1))


def load(tag_dir: Path, stem: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON fields, tensors); a missing or damaged file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tag_dir = Path(tag_dir)
    jf, tf = tag_dir / f"{stem}.json", tag_dir / f"{stem}.safetensors"
    for f in (jf, tf):
        if not f.is_file():
            raise StateError(f"{f}: missing (this checkpoint is damaged or from an older distvit); "
                             "resume from another checkpoint")
    try:
        fields = json.loads(jf.read_text())
    except (OSError, ValueError) as exc:
        raise StateError(f"{jf}: unreadable ({type(exc).__name__}: {exc})") from None
    if fields.get("format") != FORMAT:
        raise StateError(f"{jf}: state format {fields.get('format')!r}, this distvit reads {FORMAT}")
    try:
        tensors = load_file(str(tf))
    except (OSError, SafetensorError, ValueError) as exc:
        raise StateError(f"{tf}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    return fields, tensors


def ema_tensors(ema: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    return {} if ema is None else {EMA_PREFIX + k: v for k, v in ema.state_dict().items()}


def ema_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    sd = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    return sd or None


def rank_state(*, step: int, epoch: int, best: dict, data: dict, device: torch.device,
               ema: torch.nn.Module | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON fields, tensors) of one rank's state, as save_rank writes them."""
    scalars, rng_tensors = rng_state(device)
    return ({"step": step, "epoch": epoch, "best": best, "data": data, "rng": scalars},
            {**rng_tensors, **ema_tensors(ema)})


def save_rank(tag_dir: Path, rank: int, *, step: int, epoch: int, best: dict, data: dict,
              device: torch.device, ema: torch.nn.Module | None) -> None:
    save(tag_dir, rank_stem(rank), *rank_state(step=step, epoch=epoch, best=best, data=data, device=device, ema=ema))


def load_rank(tag_dir: Path, rank: int) -> dict:
    """{"step", "epoch", "best", "data", "rng": (scalars, tensors), "ema": state dict or None}."""
    fields, tensors = load(tag_dir, rank_stem(rank))
    return {**fields, "rng": (fields["rng"], tensors), "ema": ema_state(tensors)}


def save_common(tag_dir: Path, *, step: int, epoch: int, best: dict, ema: dict | None, data: dict | None = None,
                rng: tuple[dict, dict[str, torch.Tensor]] | None = None) -> None:
    fields = {"step": step, "epoch": epoch, "best": best, "data": data, "rng": None if rng is None else rng[0]}
    tensors = {} if ema is None else {EMA_PREFIX + k: v for k, v in ema.items()}
    save(tag_dir, COMMON, fields, {**tensors, **({} if rng is None else rng[1])})


def load_common(tag_dir: Path) -> dict:
    """{"step", "epoch", "best", "ema", "data" (or None), "rng": (scalars, tensors) or None}."""
    fields, tensors = load(tag_dir, COMMON)
    rng = fields.get("rng")
    rng_tensors = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return {**fields, "data": fields.get("data"), "rng": None if rng is None else (rng, rng_tensors),
            "ema": ema_state(tensors)}


def same_rng(states: list[dict]) -> bool:
    """Whether every rank's saved RNG state (python, numpy, torch, CUDA) is the same."""
    first_scalars, first_tensors = states[0]["rng"]
    for s in states[1:]:
        scalars, tensors = s["rng"]
        if scalars != first_scalars or set(tensors) != set(first_tensors):
            return False
        if not all(torch.equal(tensors[k], first_tensors[k]) for k in tensors):
            return False
    return True
