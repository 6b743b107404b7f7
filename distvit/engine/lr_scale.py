"""The learning rate from a reference batch, as timm's `--lr-base`: resolved once the world size is known.

    optim: {lr_base: 5.0e-4, lr_base_size: 256, lr_base_scale: linear}
    # global batch 1024 -> lr = 5e-4 * 1024 / 256 = 2e-3   (sqrt: 5e-4 * sqrt(1024 / 256) = 1e-3)

The global batch is data.batch_size x parallel.grad_accum x data-parallel ranks. `optim.lr` and
`optim.lr_base` are two ways to give the same number: giving both is an error, not a silent choice.
"""
from __future__ import annotations

import math

from distvit.config import Config, ConfigError


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
