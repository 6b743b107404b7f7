"""Collectives the project issues itself: the one place that knows on which device they run.

The rule (docs/design.md, "Collectives: on the group's device"): a process group has a backend per
device type (NCCL: cuda only; gloo: cpu and cuda; "cuda:gloo": cuda only). A collective runs on
the group's *communication device*:
  - the tensor's own device when the group has a backend for its type (no copy: a CUDA tensor
    under NCCL, a CPU tensor under gloo);
  - otherwise the CPU when the group has a CPU backend;
  - otherwise the current CUDA device (a CPU tensor under NCCL goes up, is reduced, comes back).
A group with no backend for any device this process has is a set-up error, said in one line.

Everything in distvit that reduces or broadcasts a tensor calls `all_reduce` / `broadcast` /
`broadcast_many` here (tests/test_device_discipline.py runs them against a group that refuses CPU
tensors). The only direct torch.distributed collectives left are those on activations (sp's
all-to-all/all-gather/ring, decode merge, gradient sums, shared masks), which already run on the
activations' device; that test scans distvit/ for any other and lists these with their reasons
(ALLOWED_DIRECT). DeepSpeed's own collectives are DeepSpeed's business.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _group(group):
    return dist.group.WORLD if group is None else group


def device_types(group=None) -> list[str]:
    """Device types the group has a backend for, e.g. ['cuda'] under NCCL, ['cpu', 'cuda'] under gloo."""
    g = _group(group)
    types = getattr(g, "_device_types", None)
    if types is not None:
        return sorted({torch.device(t).type for t in types})
    # Older torch: "cpu:gloo,cuda:nccl" or a bare backend name.
    config = str(dist.get_backend_config(g))
    if ":" not in config:
        return {"nccl": ["cuda"]}.get(config, ["cpu", "cuda"])
    return sorted({part.split(":")[0] for part in config.split(",")})


def _device_of_type(device_type: str) -> torch.device:
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def comm_device(group=None, prefer: torch.device | None = None) -> torch.device:
    """The device a collective on `group` runs on (the rule in the module docstring)."""
    types = device_types(group)
    if prefer is not None and torch.device(prefer).type in types:
        return torch.device(prefer)
    for device_type in ("cpu", "cuda", *types):
        if device_type in types:
            try:
                return _device_of_type(device_type)
            except RuntimeError:
                continue
    raise RuntimeError(
        f"the process group has backends only for device types {types}, none of which this process has "
        f"(CUDA visible: {torch.cuda.is_available()}); start it with a backend for this machine "
        f"(distvit.parallel.mesh.backend_for picks nccl on CUDA, gloo on CPU)"
    )


def _issue(name: str, tensor: torch.Tensor, group, **kwargs) -> None:
    """The c10d call itself, on a tensor already on the communication device (a test seam)."""
    getattr(dist, name)(tensor, group=group, **kwargs)


def _run(name: str, tensor: torch.Tensor, group, **kwargs) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size(_group(group)) == 1:
        return tensor
    device = comm_device(group, prefer=tensor.device)
    moved = tensor if tensor.device == device else tensor.to(device)
    _issue(name, moved, group, **kwargs)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce (op: sum | max | min) on the group's device; returns `tensor`."""
    return _run("all_reduce", tensor, group, op=_OPS[op])


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank `src` on the group's device; returns `tensor`."""
    return _run("broadcast", tensor, group, src=src)


def broadcast_many(tensors: Iterable[torch.Tensor], src: int, group=None, bucket_bytes: int = 64 << 20) -> None:
    """Broadcast many tensors in place, flattened per dtype into buckets of at most `bucket_bytes`.

    One collective per bucket instead of one per tensor; a CPU model under NCCL moves up one
    bucket at a time, so the device holds at most one bucket's worth of extra memory.
    """
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for t in tensors:
        key, nbytes = (t.device, t.dtype), t.numel() * t.element_size()
        lists = buckets.setdefault(key, [[]])
        if lists[-1] and sizes[key] + nbytes > bucket_bytes:
            lists.append([])
            sizes[key] = 0
        lists[-1].append(t)
        sizes[key] = sizes.get(key, 0) + nbytes
    for lists in buckets.values():
        for bucket in lists:
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            broadcast(flat, src, group)
            offset = 0
            for t in bucket:
                t.detach().copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
