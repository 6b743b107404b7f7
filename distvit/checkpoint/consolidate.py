"""Consolidate a DeepSpeed checkpoint (any ZeRO stage, any world size) into one fp32 state dict.

ZeRO-1/2/3 shards are merged by DeepSpeed's own zero_to_fp32 machinery; a ZeRO-0 checkpoint has
the full weights in its model-states file already. The result is written as safetensors with the
model name and resolved config in the metadata, so `distvit.models.create(name, checkpoint=FILE)`
loads it and `distvit ckpt inspect` can describe it.
Every torch file of the folder is read with weights_only=True first (checkpoint/safe_load.py):
zero_to_fp32 itself unpickles with weights_only=False, so it only sees files that hold data alone.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from distvit.checkpoint import io as ckio
from distvit.checkpoint import safe_load


class ConsolidateError(ValueError):
    pass


def check_out(out: Path, *, overwrite: bool) -> None:
    """--out must name a .safetensors file (not a folder, not a .pt) that is new or may be replaced."""
    out = Path(out)
    if out.is_dir():
        raise ConsolidateError(f"--out {out} is a folder; give a file name, e.g. --out {out / 'model.safetensors'}")
    if out.suffix != ".safetensors":
        raise ConsolidateError(f"--out {out}: consolidate writes safetensors, name it "
                               f"{out.with_suffix('.safetensors').name} (a .pt file would need pickle to load)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    tag_dir = Path(tag_dir)
    meta = ckio.read_meta(tag_dir) if (tag_dir / ckio.META).is_file() else {}
    safe_load.precheck(tag_dir)
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
        sd = safe_load.load(model_file)["module"]
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
    tmp = ckio.make_temp(out)
    try:
        save_file(tensors, tmp, metadata=metadata)
        ckio.apply_umask(tmp)  # save_file may recreate the path; give it the umask again
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise ckio.disk_full(out.parent, sum(t.numel() * t.element_size() for t in tensors.values())) from None
        raise


def consolidate(tag_dir: Path, out: Path, *, overwrite: bool = False) -> Path:
    tag_dir, out = Path(tag_dir), Path(out)
    check_out(out, overwrite=overwrite)
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

