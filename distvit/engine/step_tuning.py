"""Cuts to the fixed cost DeepSpeed adds to every step, where we can do the same work cheaper.

Found by profiling `benchmarks/trainer_overhead.py` (docs/design.md, "Per-step cost"):
- ZeRO-0, fp32: DeepSpeed clips with `runtime.utils.clip_grad_norm_`, a Python loop over the
  parameters (one norm kernel each), then all-reduces the norm over dp although every rank already
  holds the same reduced gradients, and then drops the norm (`get_global_grad_norm()` is None
  there). We clip with torch's `clip_grad_norm_(foreach=True)` after DeepSpeed's gradient
  all-reduce instead (same formula, max_norm / (norm + 1e-6) clamped at 1) and keep the norm as a
  device tensor that the host reads on log steps only.
- One rank, ZeRO-0: DeepSpeed still flattens, "all-reduces" over a group of one and copies every
  gradient back each step. With nobody to reduce with, the engine's backward all-reduce is off.
ZeRO 1-3 and bf16/fp16 keep DeepSpeed's own clipping (done on its flat partitions) and norm.
"""
from __future__ import annotations

import torch


def takes_over_clipping(ds_config: dict, zero_stage: int) -> bool:
    """Remove DeepSpeed's clipping from `ds_config` where `GradClipper` does it instead; True if so."""
    low_precision = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", zero_stage)  # after any deepspeed_extra merge
    if zero_stage == 0 and not low_precision and (ds_config.get("gradient_clipping") or 0) > 0:
        ds_config["gradient_clipping"] = 0.0
        return True
    return False


class GradClipper:
    """torch's foreach gradient clipping for ZeRO-0 fp32; `norm` is the last step's norm (device tensor)."""

    def __init__(self, module: torch.nn.Module, max_norm: float):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.max_norm = float(max_norm)
        self.norm: torch.Tensor | None = None

    def __call__(self) -> None:
        self.norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)


def tune_engine(engine, *, world_size: int, zero_stage: int, max_norm: float, clipping_taken: bool) -> GradClipper | None:
    """Apply the cuts to a built engine; returns the clipper to call at each accumulation boundary."""
    if world_size == 1 and zero_stage == 0:
        engine.enable_backward_allreduce = False
    return GradClipper(engine.module, max_norm) if clipping_taken else None


def grad_norm(engine, clipper: GradClipper | None) -> float | None:
    """The last step's global gradient norm as a float (a host read: call it on log steps only)."""
    value = clipper.norm if clipper is not None else engine.get_global_grad_norm()
    return None if value is None else float(value)
