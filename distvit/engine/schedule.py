"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr, or constant.

Expressed as a multiplier of the peak lr per optimizer step (a LambdaLR), so DeepSpeed steps it at
each gradient-accumulation boundary and saves it in its checkpoints.
"""
from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """The lr at optimizer step `step` (0-based) as a fraction of the peak lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"schedule.kind={kind!r}: expected cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, kind: str,
                    peak_lr: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = min_lr / peak_lr if peak_lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind, min_ratio=min_ratio),
    )
