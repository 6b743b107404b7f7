"""Start-up calibration of the offload performance model: time each resource on one sub-group.

Everything runs on scratch tensors, never on the engine's state: the engine's DeepSpeedCPUAdam
keeps a running beta^t per optimizer id, and an extra call on it would change the run's numbers.
"""
from __future__ import annotations

import time

import torch

from distvit.offload._model import D2H_BYTES_PER_ELEMENT, H2D_BYTES_PER_ELEMENT, Rates

CALIBRATION_ELEMENTS = 1 << 22  # 16 MiB per fp32 tensor: long enough to time, short enough at start


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, kernel selection
    best = float("inf")
    for _ in range(repeats):
        best = min(best, fn())
    return best


def calibrate(zero_opt, backend, make_kernel, param_dtype: torch.dtype, repeats: int = 3) -> Rates:
    """Measure CPU Adam, device Adam, H2D, D2H and the stock parameter write on this rank.

    `make_kernel(scratch_cpu_adam)` returns the device kernel to time; the scratch DeepSpeedCPUAdam
    has the engine's hyper-parameters and its own optimizer id.
    """
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    largest = max(t.numel() for t in zero_opt.fp32_partitioned_groups_flat)
    n = max(1024, min(largest, CALIBRATION_ELEMENTS))
    group = dict(zero_opt.optimizer.param_groups[0])
    gen = torch.Generator().manual_seed(0)

    host_param = backend.pinned(torch.randn(n, generator=gen))
    host_param.grad = backend.pinned(torch.randn(n, generator=gen) * 1e-3)
    scratch = DeepSpeedCPUAdam(
        [host_param], lr=group["lr"], betas=group["betas"], eps=group["eps"],
        weight_decay=group["weight_decay"], adamw_mode=zero_opt.optimizer.adam_w_mode,
    )

    def cpu_adam() -> float:
        t = time.perf_counter()
        scratch.step()
        return time.perf_counter() - t

    state = [backend.empty(n, torch.float32) for _ in range(4)]
    for t in state:
        t.copy_(host_param)
    kernel = make_kernel(scratch)
    step = [0]

    def device_adam() -> float:
        step[0] += 1
        with backend.on(backend.update_stream):
            state[3].abs_()  # a valid second moment
            start = backend.record(backend.update_stream)
            kernel(state[0], state[1], state[2], state[3], step[0], group)
            end = backend.record(backend.update_stream)
        backend.synchronize(end)
        return backend.elapsed_s(start, end)

    host_moments = [backend.pinned(torch.zeros(n)) for _ in range(4)]

    def transfer(stream, dsts, srcs) -> float:
        with backend.on(stream):
            start = backend.record(stream)
            for d, s in zip(dsts, srcs):
                backend.copy(d, s)
            end = backend.record(stream)
        backend.synchronize(end)
        return backend.elapsed_s(start, end)

    h2d = _best_of(lambda: transfer(backend.h2d_stream, state, host_moments), repeats)
    d2h = _best_of(lambda: transfer(backend.d2h_stream, host_moments[:3], state[:3]), repeats)

    model_side = backend.empty(n, torch.float32).to(param_dtype)
    pageable = torch.randn(n, generator=gen)

    def param_write() -> float:  # what stock does per CPU sub-group: a synchronous copy from pageable memory
        t = time.perf_counter()
        model_side.copy_(pageable)
        if model_side.is_cuda:
            torch.cuda.synchronize(model_side.device)
        return time.perf_counter() - t

    issue_s = 0.0
    if backend.concurrent:  # host time to enqueue one sub-group's copies and kernel
        t = time.perf_counter()
        with backend.on(backend.h2d_stream):
            for d, s in zip(state, host_moments):
                backend.copy(d, s)
        with backend.on(backend.update_stream):
            kernel(state[0], state[1], state[2], state[3].abs_(), 1, group)
        issue_s = time.perf_counter() - t
        torch.cuda.synchronize(backend.device)

    rates = Rates(
        cpu_adam=n / _best_of(cpu_adam, repeats),
        device_adam=n / _best_of(device_adam, repeats),
        h2d=n * H2D_BYTES_PER_ELEMENT / h2d,
        d2h=n * D2H_BYTES_PER_ELEMENT / d2h,
        param_write=n * model_side.element_size() / _best_of(param_write, repeats),
        concurrent=backend.concurrent,
        issue_s=issue_s,
    )
    del scratch
    return rates
