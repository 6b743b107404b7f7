"""Read a ZeRO checkpoint one parameter at a time, and write safetensors one tensor at a time.

Consolidation memory is bounded by the largest tensor, not the model (`distvit ckpt consolidate`).
DeepSpeed's `zero_to_fp32` builds the whole fp32 state dict; its `lazy_mode` maps the optimizer
files with `torch.load(mmap=True)` and gathers each parameter on demand (`GatheredTensor`), but
every page it reads stays mapped, so the process ends up holding the whole fp32 model as file
pages (and its `max_shard_size` path builds a shard in memory before writing it). We keep its
idea (the layout is read from the files, the data only when a parameter is gathered) and read
the bytes ourselves:

- `torch.load(map_location="meta", weights_only=True)` gives the structure with no data, and
  each storage's byte offset in the zip file (`untyped_storage()._checkpoint_offset`);
- one parameter is gathered by reading its slice of each rank's flat fp32 partition with
  `readinto` straight into the output tensor (ZeRO-3: rank r holds elements
  [off, off + ceil(numel / world)) of the parameter at `off` in its flat groups; the padding
  of the last rank is dropped, as zero_to_fp32 does);
- safetensors is written by hand in its documented layout (8-byte header size, JSON header,
  tensor bytes in header order), the header first from the known shapes, then each tensor's
  bytes as it is gathered.

Peak memory is therefore one tensor (plus the file structures), whatever the model or shard size.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

import torch

from distvit.checkpoint import safe_load

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def load_meta(path: Path):
    """The file's structure with data-less (meta) tensors whose storages know their file offset."""
    try:
        with safe_load._allowed():
            return torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refused or unreadable: one line naming the file
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise safe_load.CheckpointFileError(f"{path}: unreadable as a torch zip file ({first})") from None


class FileTensor:
    """A tensor stored in a torch zip file, read on demand (any element range, no mapping)."""

    def __init__(self, path: Path, meta: torch.Tensor):
        offset = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
        if offset is None or not meta.is_contiguous():
            raise safe_load.CheckpointFileError(f"{path}: a tensor without a contiguous file record")
        self.path, self.dtype, self.shape = path, meta.dtype, meta.shape
        self.numel = meta.numel()
        self.itemsize = meta.element_size()
        self.offset = offset + meta.storage_offset() * self.itemsize

    def read_into(self, out: torch.Tensor, start: int, handle) -> None:
        """Elements [start, start + out.numel()) into `out` (same dtype, contiguous, on the CPU)."""
        if start < 0 or start + out.numel() > self.numel:
            raise ValueError(f"{self.path}: range [{start}, {start + out.numel()}) outside {self.numel} elements")
        handle.seek(self.offset + start * self.itemsize)
        view = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        if handle.readinto(view) != len(view):
            raise safe_load.CheckpointFileError(f"{self.path}: truncated (a tensor ends past the end of the file)")

    def read(self, handle) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        self.read_into(out.view(-1), 0, handle)
        return out


class Zero3Reader:
    """Parameters of a ZeRO-3 checkpoint folder, gathered one at a time as fp32 tensors."""

    def __init__(self, tag_dir: Path):
        tag_dir = Path(tag_dir)
        model_files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_natural)
        optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_natural)
        if not model_files or len(model_files) != len(optim_files):
            raise safe_load.CheckpointFileError(
                f"{tag_dir}: {len(model_files)} ZeRO-3 model-states and {len(optim_files)} optimizer-states files; "
                "expected one of each per rank")
        state0 = safe_load.load(model_files[0])  # ZeRO-3: parameters are empty here, buffers are small
        self.world = len(optim_files)
        self.param_shapes: OrderedDict[str, torch.Size] = OrderedDict(
            (k, torch.Size(v)) for group in state0["param_shapes"] for k, v in group.items())
        buffer_names = set(state0.get("buffer_names") or [])
        self.buffers = {k: (v.float() if v.is_floating_point() else v)
                        for k, v in state0["module"].items() if k in buffer_names}
        self.shared = [(a, b) for a, b in (state0.get("shared_params") or {}).items()]
        self.frozen_shapes = OrderedDict((k, torch.Size(v)) for k, v in (state0.get("frozen_param_shapes") or {}).items())
        self.model_files = model_files
        self.groups: list[list[FileTensor]] = []  # per rank, its flat fp32 groups in order
        for f in optim_files:
            osd = load_meta(f)["optimizer_state_dict"]
            if int(osd.get("zero_stage", 3)) != 3:
                raise safe_load.CheckpointFileError(f"{f}: not a ZeRO-3 optimizer state")
            self.groups.append([FileTensor(f, t) for t in osd["fp32_flat_groups"]])
        per_rank = sum(t.numel for t in self.groups[0])
        need = sum(math.ceil(s.numel() / self.world) for s in self.param_shapes.values())
        if need != per_rank:  # zero_to_fp32's own check ("consumed N numels out of M")
            raise safe_load.CheckpointFileError(
                f"{tag_dir}: the parameters need {need} elements per rank, the flat groups hold {per_rank}")
        self._handles = [open(f, "rb") for f in optim_files]
        self._offsets: dict[str, int] = {}
        off = 0
        for name, shape in self.param_shapes.items():
            self._offsets[name] = off
            off += math.ceil(shape.numel() / self.world)

    def close(self) -> None:
        for h in self._handles:
            h.close()

    def entries(self) -> list[tuple[str, torch.Size, torch.dtype]]:
        """(name, shape, dtype) of every tensor of the state dict, in zero_to_fp32's order."""
        out = [(k, v.shape, v.dtype) for k, v in self.buffers.items()]
        out += [(k, s, torch.float32) for k, s in self.frozen_shapes.items()]
        out += [(k, s, torch.float32) for k, s in self.param_shapes.items()]
        have = {k for k, _, _ in out}
        out += [(a, dict((k, s) for k, s, _ in out)[b], dict((k, d) for k, _, d in out)[b])
                for a, b in self.shared if b in have and a not in have]
        return out

    def get(self, name: str) -> torch.Tensor:
        shared = dict(self.shared)
        if name in self.buffers:
            return self.buffers[name]
        if name in self.frozen_shapes:
            return self._frozen(name)
        if name not in self.param_shapes:
            return self.get(shared[name])
        shape = self.param_shapes[name]
        part = math.ceil(shape.numel() / self.world)
        out = torch.empty(part * self.world, dtype=torch.float32)
        for rank in range(self.world):
            self._read_rank(rank, self._offsets[name], out[rank * part:(rank + 1) * part])
        return out[:shape.numel()].view(shape)

    def _read_rank(self, rank: int, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + len(out)) of rank's flat groups (concatenated)."""
        base, filled = 0, 0
        for tensor in self.groups[rank]:
            lo, hi = max(start + filled, base), min(start + out.numel(), base + tensor.numel)
            if lo < hi:
                tensor.read_into(out[filled:filled + hi - lo], lo - base, self._handles[rank])
                filled += hi - lo
            base += tensor.numel
        if filled != out.numel():
            raise safe_load.CheckpointFileError(f"rank {rank}: its flat groups end before element {start + out.numel()}")

    def _frozen(self, name: str) -> torch.Tensor:
        frags = [safe_load.load(f, mmap=True)["frozen_param_fragments"][name] for f in self.model_files]
        shape = self.frozen_shapes[name]
        return torch.cat([t.float() for t in frags], 0)[:shape.numel()].view(shape).clone()


class Zero2Reader:
    """Parameters of a ZeRO-1/2 checkpoint, gathered one at a time as fp32 tensors.

    Each parameter group is one flat fp32 vector cut into equal partitions, rank r holding the
    r-th (`single_partition_of_fp32_groups`); parameters sit in it in `param_shapes` order, each
    followed by its alignment padding (`param_alignment_paddings`, when the file has it), as
    zero_to_fp32's `_zero2_merge_trainable_params` reads them.
    """

    def __init__(self, tag_dir: Path):
        tag_dir = Path(tag_dir)
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_natural)
        if not model_file.is_file() or not optim_files:
            raise safe_load.CheckpointFileError(f"{tag_dir}: no mp_rank_00_model_states.pt or no optimizer-states files")
        state0 = load_meta(model_file)
        self._model_handle = open(model_file, "rb")
        buffer_names = set(state0.get("buffer_names") or [])
        self.buffers = {k: FileTensor(model_file, v) for k, v in state0["module"].items() if k in buffer_names}
        frags = state0.get("frozen_param_fragments") or {}
        self.frozen = {k: FileTensor(model_file, frags[k]) for k in (state0.get("frozen_param_shapes") or {})}
        self.shared = [(a, b) for a, b in (state0.get("shared_params") or {}).items()]
        groups = [OrderedDict((k, torch.Size(v)) for k, v in g.items()) for g in state0["param_shapes"]]
        self.parts: list[list[FileTensor]] = []  # per rank, per group: its partition
        paddings = None
        for f in optim_files:
            osd = load_meta(f)["optimizer_state_dict"]
            self.parts.append([FileTensor(f, t) for t in osd["single_partition_of_fp32_groups"]])
            paddings = paddings if paddings is not None else osd.get("param_alignment_paddings")
        self._handles = [open(f, "rb") for f in optim_files]
        self.world = len(optim_files)
        self.place: OrderedDict[str, tuple[int, int, torch.Size]] = OrderedDict()  # name -> (group, offset, shape)
        align = 2 * self.world  # zero_to_fp32's sanity check: both ends agree up to this alignment
        for g, shapes in enumerate(groups):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                self.place[name] = (g, offset, shape)
                offset += shape.numel() + (paddings[g][i] if paddings is not None else 0)
            avail = sum(p[g].numel for p in self.parts)
            if align * math.ceil(offset / align) != align * math.ceil(avail / align):
                raise safe_load.CheckpointFileError(
                    f"{tag_dir}: parameter group {g} needs {offset} elements, its partitions hold {avail}")

    def close(self) -> None:
        for h in [self._model_handle, *self._handles]:
            h.close()

    def entries(self) -> list[tuple[str, torch.Size, torch.dtype]]:
        out = [(k, t.shape, torch.float32 if t.dtype.is_floating_point else t.dtype) for k, t in self.buffers.items()]
        out += [(k, t.shape, torch.float32) for k, t in self.frozen.items()]
        out += [(k, shape, torch.float32) for k, (_, _, shape) in self.place.items()]
        have = {k: (s, d) for k, s, d in out}
        out += [(a, *have[b]) for a, b in self.shared if b in have and a not in have]
        return out

    def get(self, name: str) -> torch.Tensor:
        if name in self.buffers or name in self.frozen:
            t = (self.buffers.get(name) or self.frozen[name]).read(self._model_handle)
            return t.float() if t.is_floating_point() else t
        if name not in self.place:
            return self.get(dict(self.shared)[name])
        g, offset, shape = self.place[name]
        out = torch.empty(shape.numel(), dtype=torch.float32)
        base, filled = 0, 0
        for rank in range(self.world):  # the group's flat vector is the ranks' partitions end to end
            part = self.parts[rank][g]
            lo, hi = max(offset + filled, base), min(offset + out.numel(), base + part.numel)
            if lo < hi:
                part.read_into(out[filled:filled + hi - lo], lo - base, self._handles[rank])
                filled += hi - lo
            base += part.numel
        if filled != out.numel():
            raise safe_load.CheckpointFileError(f"{name}: its partitions end before element {offset + out.numel()}")
        return out.view(shape)


class Zero0Reader:
    """A ZeRO-0 checkpoint: the whole module in mp_rank_00_model_states.pt, read one tensor at a time."""

    def __init__(self, model_file: Path):
        sd = load_meta(model_file)["module"]
        self.tensors = {k: FileTensor(model_file, v) for k, v in sd.items() if torch.is_tensor(v)}
        self._handle = open(model_file, "rb")

    def close(self) -> None:
        self._handle.close()

    def entries(self) -> list[tuple[str, torch.Size, torch.dtype]]:
        return [(k, t.shape, torch.float32 if t.dtype.is_floating_point else t.dtype) for k, t in self.tensors.items()]

    def get(self, name: str) -> torch.Tensor:
        t = self.tensors[name].read(self._handle)
        return t.float() if t.is_floating_point() else t


class DictReader:
    """An in-memory state dict behind the same interface (ZeRO-1/2 and universal checkpoints)."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd = sd

    def close(self) -> None:
        pass

    def entries(self):
        return [(k, v.shape, v.dtype) for k, v in self.sd.items()]

    def get(self, name: str) -> torch.Tensor:
        return self.sd[name]


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 (Hugging Face's units: KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"--max-shard-size {text!r}: must be above zero")
    return size


def plan_shards(entries: Iterable[tuple[str, torch.Size, torch.dtype]], max_bytes: int) -> list[list]:
    """Greedy, in order, as Hugging Face shards: a tensor over max_bytes gets a shard of its own."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[1].numel() * torch.empty((), dtype=entry[2]).element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def write_safetensors(path: Path, entries: list, get: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> int:
    """Write `entries` to `path` (an open temp path), the header first, then one tensor at a time.
    Returns the bytes of tensor data written."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            t = get(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{name}: gathered {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
            t = t.detach().contiguous().cpu()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())
    return offset
