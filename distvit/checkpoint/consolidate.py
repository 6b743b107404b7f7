"""Consolidate a DeepSpeed checkpoint (any ZeRO stage, any world size) into fp32 safetensors.

    consolidate(tag_dir, Path("out/model.safetensors"), max_shard_size="5GB")

Checkpoints of every ZeRO stage are streamed one tensor at a time (checkpoint/stream.py): peak
memory is the largest tensor, not the model. The output is one file when it fits in
`max_shard_size`, else Hugging Face's layout beside it: model-00001-of-0000N.safetensors and
model.safetensors.index.json (`weight_map`: tensor -> shard), which
`distvit.models.create(name, checkpoint=...)` and transformers/timm-style loaders read.
A reshaped (universal) checkpoint is merged in memory by reshape.py's reader, then written the same way.
Every file carries the model name, step and resolved config in its metadata.
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


def index_path(out: Path) -> Path:
    return out.with_name(out.name + ".index.json")


def shard_name(out: Path, i: int, n: int) -> str:
    return f"{out.stem}-{i:05d}-of-{n:05d}{out.suffix}"


def check_out(out: Path, *, overwrite: bool) -> None:
    """--out must name a .safetensors file (not a folder, not a .pt) that is new or may be replaced."""
    out = Path(out)
    if out.is_dir():
        raise ConsolidateError(f"--out {out} is a folder; give a file name, e.g. --out {out / 'model.safetensors'}")
    if out.suffix != ".safetensors":
        raise ConsolidateError(f"--out {out}: consolidate writes safetensors, name it "
                               f"{out.with_suffix('.safetensors').name} (a .pt file would need pickle to load)")
    for existing in (out, index_path(out)):
        if existing.exists() and not overwrite:
            raise FileExistsError(f"{existing} exists; pass --overwrite to replace it, or choose another --out")


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    tag_dir = Path(tag_dir)
    meta = ckio.read_meta_if_any(tag_dir)  # None: a folder DeepSpeed wrote without distvit
    safe_load.precheck(tag_dir)
    if meta is not None and meta.universal:  # written by `distvit ckpt reshape`: whole fp32 tensors already
        from distvit.checkpoint.reshape import universal_state_dict

        return universal_state_dict(tag_dir)
    stage = meta.zero_stage if meta is not None else None
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


def reader_for(tag_dir: Path):
    """A streaming reader for ZeRO 0-3; a reshaped (universal) checkpoint is read whole."""
    from distvit.checkpoint import stream

    tag_dir = Path(tag_dir)
    meta = ckio.read_meta_if_any(tag_dir)
    stage = meta.zero_stage if meta is not None else None
    if meta is None or not meta.universal:
        if stage == 3 or (stage is None and list(tag_dir.glob("zero_pp_rank_*_model_states.pt"))):
            safe_load.precheck(tag_dir)
            return stream.Zero3Reader(tag_dir)
        if stage in (1, 2):
            safe_load.precheck(tag_dir)
            return stream.Zero2Reader(tag_dir)
        if stage == 0 or (stage is None and not list(tag_dir.glob("*optim_states.pt"))):
            safe_load.precheck(tag_dir)
            model_file = tag_dir / "mp_rank_00_model_states.pt"
            if not model_file.is_file():
                raise FileNotFoundError(f"{tag_dir}: no mp_rank_00_model_states.pt; is this a DeepSpeed checkpoint folder?")
            return stream.Zero0Reader(model_file)
    return stream.DictReader(consolidated_state_dict(tag_dir))


def consolidate(tag_dir: Path, out: Path, *, overwrite: bool = False, max_shard_size: str | int = "5GB") -> Path:
    """Write the fp32 weights of `tag_dir` to `out` (one file) or to shards and out's index; returns
    the path to load (`out`, or the index when sharded). Each file is atomic; the index is written last."""
    from distvit.checkpoint import stream

    tag_dir, out = Path(tag_dir), Path(out)
    check_out(out, overwrite=overwrite)
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else stream.parse_size(max_shard_size)
    meta = ckio.read_meta_if_any(tag_dir)
    metadata = {
        "format": "pt",
        "model": meta.model if meta is not None else "",
        "step": str(meta.step) if meta is not None else "",
        "config": json.dumps(meta.config if meta is not None else {}),
    }
    reader = reader_for(tag_dir)
    try:
        shards = stream.plan_shards(reader.entries(), max_bytes)
        names = [out.name] if len(shards) == 1 else [shard_name(out, i + 1, len(shards)) for i in range(len(shards))]
        out.parent.mkdir(parents=True, exist_ok=True)
        total = 0
        for name, entries in zip(names, shards):
            total += _write_atomic(out.parent / name, entries, reader.get, metadata)
    finally:
        reader.close()
    old_index = index_path(out)
    stale = set()
    if old_index.is_file():  # a previous sharded result: its shards go once the new result is in place
        try:
            stale = set(json.loads(old_index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if len(shards) == 1:
        old_index.unlink(missing_ok=True)
        result = out
    else:
        weight_map = {entry[0]: name for name, entries in zip(names, shards) for entry in entries}
        index = {"metadata": {"total_size": total, **{k: v for k, v in metadata.items() if k != "config"}},
                 "weight_map": weight_map}
        ckio.atomic_write_text(old_index, json.dumps(index, indent=2))
        out.unlink(missing_ok=True)  # a previous single-file result would shadow the index
        result = old_index
    for name in stale - set(names):
        (out.parent / name).unlink(missing_ok=True)
    return result


def _write_atomic(path: Path, entries: list, get, metadata: dict) -> int:
    from distvit.checkpoint import stream

    tmp = ckio.make_temp(path)
    try:
        nbytes = stream.write_safetensors(Path(tmp), entries, get, metadata)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise ckio.disk_full(path.parent, sum(e[1].numel() * 4 for e in entries)) from None
        raise
    return nbytes
