"""The device side of interleaved offload: streams, events, pinned memory and copies.

Two backends with one interface, so the schedule code is the same on both:

- `CudaBackend`: three CUDA streams (H2D, update, D2H) ordered by CUDA events, pinned host
  memory, non-blocking copies; the host only enqueues work and waits at the end of the step.
- `HostStandIn`: the "device" is a second set of CPU tensors. Streams are no-ops and every
  operation runs at once on the host, so the same slots, copies and ordering are exercised
  (and tested) on machines without a GPU. Events carry host timestamps.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch


class _HostEvent:
    __slots__ = ("t",)

    def __init__(self):
        self.t = time.perf_counter()


class HostStandIn:
    """CPU tensors play the device; every operation is synchronous."""

    concurrent = False
    name = "cpu-stand-in"

    def __init__(self):
        self.device = torch.device("cpu")
        self.h2d_stream = self.update_stream = self.d2h_stream = None

    def on(self, stream: Any):
        return contextlib.nullcontext()

    def record(self, stream: Any) -> _HostEvent:
        return _HostEvent()

    def wait(self, stream: Any, event: Any) -> None:
        pass  # work already finished when the event was recorded

    def wait_for_current(self, stream: Any) -> None:
        pass

    def synchronize(self, event: Any) -> None:
        pass

    def join_current(self, stream: Any) -> None:
        pass

    def elapsed_s(self, start: _HostEvent, end: _HostEvent) -> float:
        return end.t - start.t

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def pinned(self, t: torch.Tensor) -> torch.Tensor:
        return t  # nothing to pin: no DMA engine reads it

    def is_pinned(self, t: torch.Tensor) -> bool:
        return True

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype)

    def memory_budget(self) -> float:
        """Bytes the stand-in may use for slots: half of the host memory still available."""
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
        except (ValueError, OSError):  # not a POSIX sysconf: assume a small machine
            return 2**30

    def peak_memory(self) -> int | None:
        return None


class CudaBackend:
    """Three streams and timing events on one CUDA device; pinned host buffers."""

    concurrent = True
    name = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self.h2d_stream = torch.cuda.Stream(device)
        self.update_stream = torch.cuda.Stream(device)
        self.d2h_stream = torch.cuda.Stream(device)

    def on(self, stream):
        return torch.cuda.stream(stream)

    def record(self, stream) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def wait_for_current(self, stream) -> None:
        """`stream` waits for what is already queued on the current stream (the gradient D2H of backward)."""
        stream.wait_stream(torch.cuda.current_stream(self.device))

    def join_current(self, stream) -> None:
        """The current stream (next forward) waits for `stream` (parameter writes of the update)."""
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def synchronize(self, event) -> None:
        event.synchronize()

    def elapsed_s(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)  # enqueued on the stream of the enclosing `on(...)`

    def pinned(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.is_pinned() else t.pin_memory()

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.is_pinned()

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self.device)

    def memory_budget(self) -> float:
        """Free device bytes now plus what the caching allocator holds unused (freed activations)."""
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return float(free + cached)

    def peak_memory(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device)


def backend_for(device: torch.device) -> HostStandIn | CudaBackend:
    if device.type == "cuda":
        return CudaBackend(device)
    if device.type == "cpu":
        return HostStandIn()
    raise ValueError(
        f"interleaved offload runs on CUDA or on the CPU stand-in, not on device {device} "
        "(from the DeepSpeed accelerator); use parallel.offload=cpu on this accelerator"
    )
