"""Interleaved optimizer-state offload for ZeRO-3 (the handle behind `distvit.offload.enable`).

Modes (design note: README.md beside this file; the DeepSpeed fragment: _settings.Settings.ds_fragment):
  none        optimizer state on the device
  cpu         DeepSpeed's ZeRO-Offload: fp32 master weights and Adam moments on the host,
              DeepSpeedCPUAdam updates every sub-group
  partial     DeepSpeed's `offload_optimizer.ratio`: a fixed share of sub-groups keeps its state
              on the device for the whole run
  interleaved state on the host as in `cpu`; each step a performance model picks sub-groups
              whose state is copied to the device, updated there and copied back, overlapped
              with CPU Adam on the rest ("Deep Optimizer States")

Use:
    settings = offload.Settings("interleaved", "auto", log_every=50)
    ds = {..., "zero_optimization": {"stage": 3, **settings.ds_fragment(50_000_000)}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=DeepSpeedCPUAdam(...), config=ds)
    handle = offload.enable(engine, settings)
    ...
    handle.stats()   # predicted vs measured update time, transfer times
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from distvit.offload._backend import backend_for
from distvit.offload._calibrate import calibrate
from distvit.offload._kernels import CpuAdamStandIn, TorchAdam
from distvit.offload._model import SLOT_BYTES_PER_ELEMENT, Plan, Rates
from distvit.offload._replan import Replanner
from distvit.offload._schedule import InterleavedZero3Hooks, StepRecord, SubGroupPipeline
from distvit.offload._settings import Settings

MEMORY_HEADROOM = 0.9  # share of the free device memory the slots may take


def param_offload_error(device: torch.device, source: str) -> str:
    """The one-line refusal of interleaved offload with zero_optimization.offload_param.device=cpu."""
    return (f"interleaved offload updates the ZeRO-3 parameter partitions on the {device.type} device, but "
            f"zero_optimization.offload_param.device is 'cpu' (from {source}), which keeps them in host memory; "
            "remove offload_param from the DeepSpeed config, or use parallel.offload=cpu (DeepSpeed's own offload, "
            "which supports offload_param)")


def _say_with(logger) -> Callable[[str], None]:
    if logger is None:
        return lambda msg: print(msg, flush=True)
    if hasattr(logger, "info"):
        return logger.info
    return logger


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class InterleavedOffload:
    """Handle returned by `enable`: the plan, measurements and re-planning."""

    def __init__(self, zero_opt, backend, kernel, rates: Rates, settings: Settings, *, say: Callable[[str], None],
                 recalibrate: Callable[[], Rates] | None = None):
        self.zero_opt = zero_opt
        self.backend = backend
        self.kernel = kernel
        self.settings = settings
        self.fraction = settings.gpu_fraction
        self.log_every = settings.log_every
        self._say = say
        self.pipeline = SubGroupPipeline(zero_opt, backend, kernel)
        self.sizes = tuple(t.numel() for t in zero_opt.fp32_partitioned_groups_flat)
        self.steps = 0
        self._last: StepRecord | None = None
        self._measured_sum = 0.0
        self._original_class = None
        self.replanner = Replanner(
            self.sizes, settings, rates, param_bytes=zero_opt.fp16_partitioned_groups_flat[0].element_size(),
            memory_budget=backend.memory_budget() * MEMORY_HEADROOM, recalibrate=recalibrate,
        )

    @property
    def plan(self) -> Plan:
        return self.replanner.plan

    @property
    def rates(self) -> Rates:
        return self.replanner.rates

    @property
    def replans(self) -> int:
        return self.replanner.replans

    def _tell(self, message: str | None) -> None:
        if message and _rank() == 0:
            self._say(message)

    # -- called by the hooks ----------------------------------------------------------------
    def _loop_started(self) -> None:
        if self.pipeline.active:
            return
        if self.backend.concurrent:  # activations are freed now: this is the memory the slots can have
            budget = self.backend.memory_budget() * MEMORY_HEADROOM
            if self.plan.slot_bytes > budget:
                self._tell(self.replanner.shrink_memory(budget, f"only {budget / 2**20:.0f} MiB free for slots"))
        self.pipeline.begin(self.plan.on_device, self.plan.resident)

    def _loop_finished(self) -> None:
        if not self.pipeline.active:
            return
        rec = self.pipeline.finish()
        self._last = rec
        self.steps += 1
        self._measured_sum += rec.wall_s
        predicted = self.plan.predicted_s
        if self.log_every and self.steps % self.log_every == 0 and _rank() == 0:
            self._say(
                f"offload step {self.steps}: update {rec.wall_s * 1e3:.2f} ms measured vs "
                f"{predicted * 1e3:.2f} ms predicted; H2D {rec.h2d_s * 1e3:.2f} ms, device Adam "
                f"{rec.device_adam_s * 1e3:.2f} ms, D2H {rec.d2h_s * 1e3:.2f} ms, CPU Adam {rec.cpu_adam_s * 1e3:.2f} ms"
            )
        self._tell(self.replanner.observe(rec))

    # -- reporting --------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Predicted vs measured update time and the last step's breakdown, in seconds."""
        last = self._last or StepRecord()
        return {
            "steps": self.steps,
            "replans": self.replanner.replans,
            "refits": self.replanner.refits,
            "step_overhead_s": self.rates.step_overhead_s,
            "measured_placements": dict(self.replanner.measured),
            "device_subgroups": len(self.plan.on_device),
            "subgroups": len(self.sizes),
            "device_fraction": self.plan.device_fraction,
            "resident": self.plan.resident,
            "slot_bytes": self.plan.slot_bytes,
            "predicted_update_s": self.plan.predicted_s,
            "predicted_cpu_only_s": self.plan.predicted_cpu_only_s,
            "measured_update_s": last.wall_s,
            "measured_update_mean_s": self._measured_sum / self.steps if self.steps else 0.0,
            "h2d_s": last.h2d_s,
            "device_adam_s": last.device_adam_s,
            "d2h_s": last.d2h_s,
            "cpu_adam_s": last.cpu_adam_s,
            "param_write_s": last.param_write_s,
            "h2d_bytes": last.h2d_bytes,
            "d2h_bytes": last.d2h_bytes,
            "kernel": self.kernel.name,
            "backend": self.backend.name,
        }

    def disable(self) -> None:
        """Give the optimizer its DeepSpeed class back (between steps); the state stays where it is."""
        if self.pipeline.active:
            raise RuntimeError("interleaved offload cannot be disabled in the middle of an optimizer step")
        if self._original_class is not None:
            self.zero_opt.__class__ = self._original_class
            del self.zero_opt._interleaved
            self._original_class = None


def _validate(engine) -> Any:
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    stage = engine.zero_optimization_stage()
    if stage != 3:
        raise ValueError(
            f"interleaved offload extends ZeRO-3's per-sub-group step, but zero_optimization.stage is {stage} "
            "in the DeepSpeed config; set parallel.zero_stage=3"
        )
    opt = engine.optimizer
    if isinstance(opt, InterleavedZero3Hooks):
        raise ValueError("interleaved offload is already enabled on this engine (offload.enable was called twice)")
    if not isinstance(opt, DeepSpeedZeroOptimizer_Stage3) or getattr(engine, "super_offload", lambda: False)():
        raise ValueError(
            f"interleaved offload hooks DeepSpeedZeroOptimizer_Stage3's step loop, but the engine's optimizer is "
            f"{type(opt).__name__}; turn off offload_optimizer.super_offload / ZenFlow in the DeepSpeed config"
        )
    if not opt.offload_optimizer or opt.swap_optimizer:
        device = engine.zero_offload_optimizer().device if engine.zero_offload_optimizer() else "none"
        raise ValueError(
            f"interleaved offload keeps the optimizer state in host memory: zero_optimization.offload_optimizer.device "
            f"must be 'cpu', got {device!r}; build the fragment with Settings('interleaved').ds_fragment()"
        )
    if opt.partial_offload != 1.0:
        raise ValueError(
            f"zero_optimization.offload_optimizer.ratio={opt.partial_offload} keeps sub-groups on the device for the "
            "whole run (partial offload); interleaved offload needs ratio 1.0: use Settings('interleaved').ds_fragment()"
        )
    if type(opt.optimizer) is not DeepSpeedCPUAdam:
        raise ValueError(
            f"interleaved offload shares DeepSpeedCPUAdam's state and hyper-parameters, but the optimizer is "
            f"{type(opt.optimizer).__name__}; pass deepspeed.ops.adam.DeepSpeedCPUAdam (or config optimizer type Adam/AdamW)"
        )
    if not opt.optimizer.fp32_optimizer_states or opt.master_weights_and_grads_dtype != torch.float32:
        raise ValueError("interleaved offload moves fp32 master weights and fp32 Adam moments; "
                         "turn off bf16/fp16 master weights and optimizer states in the DeepSpeed config")
    if opt.zenflow or opt.use_muon or opt.torch_autocast_gradscaler is not None:
        raise ValueError("interleaved offload does not combine with ZenFlow, Muon or torch-autocast fp16 in DeepSpeed; "
                         "turn those off or use parallel.offload=cpu")
    if any(t is None for t in opt.fp16_partitioned_groups_flat):
        raise ValueError("interleaved offload needs the parameter partitions in memory; "
                         "zero_optimization.offload_param.device=nvme is not supported, use 'cpu' or 'none'")
    return opt


def enable(engine, settings: Settings | None = None, *, logger: Any = None, rates: Rates | None = None) -> InterleavedOffload:
    """Install the interleaved schedule into a ZeRO-3 + CPU-offload engine; call right after deepspeed.initialize.

    settings: `Settings("interleaved", ...)` (the fraction, logging, re-planning knobs); default: auto.
    logger: a callable taking a string, an object with `.info`, or None for print (rank 0 only).
    rates: skip the start-up calibration and plan with these speeds (re-plans still measure).
    """
    settings = settings or Settings()
    if settings.mode != "interleaved":
        raise ValueError(f"offload.enable installs interleaved offload, but the settings say mode={settings.mode!r}; "
                         "DeepSpeed alone runs none/cpu/partial (Settings.ds_fragment): call enable only for interleaved")
    opt = _validate(engine)
    lp = opt.fp16_partitioned_groups_flat[0]
    # The backend follows the accelerator, not where the partitions happen to live: with
    # offload_param=cpu they sit in host memory even on a GPU machine (the CPU stand-in would run).
    device = torch.device(engine.device) if getattr(engine, "device", None) is not None else lp.device
    if lp.device.type != device.type:
        raise ValueError(param_offload_error(device, "the DeepSpeed config"))
    backend = backend_for(device)
    kernel = settings.kernel
    if kernel == "auto":
        kernel = "torch" if backend.concurrent else "cpu_adam"
    if kernel == "cpu_adam" and backend.concurrent:
        raise ValueError("kernel='cpu_adam' runs on host tensors only (the CPU stand-in); use kernel='torch' on CUDA")

    def make_kernel(cpu_adam):
        return TorchAdam(opt.optimizer.adam_w_mode) if kernel == "torch" else CpuAdamStandIn(cpu_adam)

    def recalibrate() -> Rates:
        return calibrate(opt, backend, make_kernel, lp.dtype)

    handle = InterleavedOffload(
        opt, backend, make_kernel(opt.optimizer), rates or recalibrate(), settings, say=_say_with(logger),
        recalibrate=recalibrate,
    )
    handle._original_class = type(opt)
    opt.__class__ = type(f"Interleaved{type(opt).__name__}", (InterleavedZero3Hooks, type(opt)), {})
    opt._interleaved = handle
    if _rank() == 0:
        handle._say(handle.plan.describe())
        advice = granularity_advice(handle.sizes, opt.sub_group_size, max_resident=settings.max_resident,
                                    memory_budget=handle.replanner.memory_budget if backend.concurrent else None)
        if advice:
            handle._say(advice)
    return handle


COARSEST_SHARE = 0.4  # one sub-group above this share of a rank's elements leaves too little to place
PIECES = 8  # sub-groups per rank the suggestion aims at: 1/8 steps of the fraction, room to pipeline


def suggest_sub_group_size(elements_per_rank: int, *, max_resident: int = 2, memory_budget: float | None = None) -> int:
    """A `parallel.sub_group_size` that cuts a rank's optimizer state into about 8 sub-groups.

    DeepSpeed's default (1e9 elements) leaves one sub-group per parameter group, which interleaved
    offload cannot split. With `memory_budget` (device bytes free for the update phase), the size
    is also capped so that `max_resident` slots of 16 B per element fit in it.
    Rounded to two significant digits; at least 1.
    """
    if elements_per_rank < 1:
        raise ValueError(f"elements_per_rank must be >= 1, got {elements_per_rank}")
    size = -(-elements_per_rank // PIECES)
    if memory_budget is not None:
        size = min(size, int(memory_budget // (SLOT_BYTES_PER_ELEMENT * max_resident)))
    size = max(1, size)
    digits = max(0, len(str(size)) - 2)
    return max(1, round(size, -digits))


def granularity_advice(sizes: tuple[int, ...], sub_group_size: int, *, max_resident: int = 2,
                       memory_budget: float | None = None) -> str | None:
    """What to set when the sub-groups are too coarse to split the update (None when they are fine)."""
    total = sum(sizes)
    largest = max(sizes)
    if total == 0 or largest <= COARSEST_SHARE * total:
        return None
    how = ("cannot be split at all" if len(sizes) == 1
           else f"can only move in pieces that coarse (the largest holds {largest / total:.0%})")
    return (
        f"interleaved offload: this rank's {total:,} optimizer elements sit in {len(sizes)} sub-group(s) "
        f"(parallel.sub_group_size={sub_group_size:,}), so the update {how}; set "
        f"parallel.sub_group_size={suggest_sub_group_size(total, max_resident=max_resident, memory_budget=memory_budget)} "
        f"(about 1/{PIECES} of a rank's elements) to interleave"
    )
