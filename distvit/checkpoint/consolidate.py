"""Consolidate a DeepSpeed checkpoint (any ZeRO stage, any world size) into one fp32 state dict.

ZeRO-1/2/3 shards are merged by DeepSpeed's own zero_to_fp32 machinery; a ZeRO-0 checkpoint has
the full weights in its model-states file already. The result is written as safetensors with the
model name and resolved config in the metadata, so `distvit.models.create(name, checkpoint=FILE)`
loads it and `distvit ckpt inspect` can describe it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from distvit.checkpoint import io as ckio


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    tag_dir = Path(tag_dir)
    meta = ckio.read_meta(tag_dir) if (tag_dir / ckio.META).is_file() else {}
    if meta.get("universal"):  # written by `distvit ckpt reshape`: whole fp32 tensors already
        from distvit.checkpoint.reshape import universal_state_dict

        return universal_state_dict(tag_dir)
    stage = meta.get("zero_stage")
    if stage is None:
        stage = 0 if not list(tag_dir.glob("*optim_states.pt")) else None
    if stage == 0:
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise FileNotFoundError(f"{tag_dir}: no mp_rank_00_model_states.pt; is this a DeepSpeed checkpoint folder?")
        sd = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def save_safetensors(state_dict: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Atomic safetensors write; tensors sharing storage are cloned (safetensors refuses aliases)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def consolidate(tag_dir: Path, out: Path, *, overwrite: bool = False) -> Path:
    tag_dir, out = Path(tag_dir), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    meta = ckio.read_meta(tag_dir) if (tag_dir / ckio.META).is_file() else {}
    sd = consolidated_state_dict(tag_dir)
    metadata = {
        "format": "pt",
        "model": str(meta.get("model", "")),
        "step": str(meta.get("step", "")),
        "config": json.dumps(meta.get("config", {})),
    }
    save_safetensors(sd, out, metadata)
    return out
