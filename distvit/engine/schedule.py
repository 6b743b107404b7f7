"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr, constant, or wsd
(warmup-stable-decay: the peak until the last `decay_fraction` of the steps, then linear to min_lr).
With layer decay each param group starts at its own lr; the multiplier scales them all alike.

Expressed as a multiplier of the peak lr per optimizer step (a LambdaLR), so DeepSpeed steps it at
each gradient-accumulation boundary and saves it in its checkpoints.
"""
from __future__ import annotations

import math

import torch

from distvit.choices import SCHEDULES


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, kind: str, min_ratio: float,
                  decay_fraction: float = 0.1) -> float:
    """The lr at optimizer step `step` (0-based) as a fraction of the peak lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "wsd":  # warmup-stable-decay: peak until the last decay_fraction of the steps, then linear
        decay_steps = max(1, round(decay_fraction * total_steps))
        start = total_steps - decay_steps
        if step < start:
            return 1.0
        return min_ratio + (1.0 - min_ratio) * max(0.0, 1.0 - (step - start) / decay_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"schedule.kind={kind!r}: expected one of {', '.join(SCHEDULES)}")
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, kind: str,
                    peak_lr: float, min_lr: float, decay_fraction: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = min_lr / peak_lr if peak_lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind,
                                   min_ratio=min_ratio, decay_fraction=decay_fraction),
    )
