"""The config as one run uses it, resolved once the world size and device are known (before any
engine exists); `--print-config` shows this, and the Trainer reads nothing else.

- the rules that need the world size and device or the model classes (config/checks.py
  `check_launch`): data.repeated_aug <= dp ranks, interleaved offload without offload_param on a
  GPU, packed forwards for data.packing.
- parallel.precision: auto -> bf16 on a CUDA device that supports it, else fp32.
- optim.lr from a reference batch, as timm's `--lr-base`:

    optim: {lr_base: 5.0e-4, lr_base_size: 256, lr_base_scale: linear}
    # global batch 1024 -> lr = 5e-4 * 1024 / 256 = 2e-3   (sqrt: 5e-4 * sqrt(1024 / 256) = 1e-3)

The global batch is data.batch_size x parallel.grad_accum x data-parallel ranks. `optim.lr` and
`optim.lr_base` are two ways to give the same number: giving both is an error, not a silent choice.
"""
from __future__ import annotations

import math

import torch

from distvit.config.schema import Config, ConfigError


def resolve_lr(cfg: Config, dp_size: int) -> tuple[float, str]:
    """(peak LR, one line for the banner saying where it came from)."""
    o = cfg.optim
    global_batch = cfg.data.batch_size * cfg.parallel.grad_accum * dp_size
    if o.lr_base is None:
        return o.lr, f"lr {o.lr:.4g} (optim.lr)"
    if o.lr_base <= 0 or o.lr_base_size < 1:
        raise ConfigError(f"optim.lr_base={o.lr_base:g} and optim.lr_base_size={o.lr_base_size} must be > 0 and >= 1")
    if "lr" in o.model_fields_set:
        raise ConfigError(f"optim.lr={o.lr:g} and optim.lr_base={o.lr_base:g} are both set; give one: the LR itself "
                          f"(optim.lr) or the LR at batch optim.lr_base_size={o.lr_base_size} (optim.lr_base), "
                          "e.g. remove optim.lr from the config")
    ratio = global_batch / o.lr_base_size
    lr = o.lr_base * (ratio if o.lr_base_scale == "linear" else math.sqrt(ratio))
    how = f"{global_batch}/{o.lr_base_size}" if o.lr_base_scale == "linear" else f"sqrt({global_batch}/{o.lr_base_size})"
    return lr, f"lr {lr:.4g} = optim.lr_base {o.lr_base:g} x {how} ({o.lr_base_scale} scaling to global batch {global_batch})"


def apply(cfg: Config, dp_size: int) -> str:
    """Write the resolved LR into cfg.optim.lr (what the optimizer and schedule read); returns the banner line."""
    lr, line = resolve_lr(cfg, dp_size)
    if cfg.optim.lr_base is not None:
        cfg.optim.lr = lr
        cfg.optim.model_fields_set.discard("lr")  # derived, not given: resolving the same cfg again is fine
    return line


def resolve_precision(cfg: Config, device: torch.device) -> str:
    p = cfg.parallel.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if p in ("bf16", "fp16") and device.type == "cpu" and cfg.parallel.zero_stage == 0:
        # DeepSpeed's bf16/fp16 wrappers need a ZeRO optimizer on the CPU accelerator.
        raise ConfigError(f"parallel.precision={p} on the CPU needs parallel.zero_stage >= 1; use precision=fp32 or zero_stage=1")
    return p


def resolve(cfg: Config, *, dp_size: int, device: torch.device) -> tuple[Config, str]:
    """A resolved copy of cfg (precision and lr concrete) and the banner line saying where the lr came from;
    refuses what this launch could not run (config/checks.py `check_launch`)."""
    from distvit.config.checks import check_launch

    check_launch(cfg, dp_size=dp_size, device=device)
    cfg = cfg.model_copy(deep=True)
    line = apply(cfg, dp_size)
    cfg.optim.lr_base = None  # the lr is concrete now: the printed / saved config loads again as it is
    cfg.parallel.precision = resolve_precision(cfg, device)
    return cfg, line
