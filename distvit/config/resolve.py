"""The config as one run uses it, resolved once the world size and device are known (before any
process group or engine exists); `--print-config` shows this, and the Trainer reads nothing else.

    cfg, lr_line, launch = for_launch(cfg)   # world size from the launcher's env, device from run.device

- the rules that need the launch or the model classes (config/checks.py `check_launch`): sp_size
  divides the world, data.repeated_aug <= dp ranks, interleaved offload without offload_param on
  a GPU, packed forwards for data.packing.
- parallel.precision: auto -> bf16 on a CUDA device that supports it, else fp32.
- optim.lr from a reference batch, as timm's `--lr-base`:

    optim: {lr_base: 5.0e-4, lr_base_size: 256, lr_base_scale: linear}
    # global batch 1024 -> lr = 5e-4 * 1024 / 256 = 2e-3   (sqrt: 5e-4 * sqrt(1024 / 256) = 1e-3)

The global batch is data.batch_size x parallel.grad_accum x data-parallel ranks. `optim.lr` and
`optim.lr_base` are two ways to give the same number: giving both is an error, not a silent choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
        if device.type != "cuda":
            return "fp32"
        # A CUDA device this machine does not have (--print-config for a GPU launch): Ampere or newer assumed.
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"
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


@dataclass(frozen=True)
class Launch:
    """What a run is launched on, known before any process group exists."""
    world_size: int
    dp_size: int
    device: torch.device
    launcher: str  # torch | slurm | openmpi | pmi | single (parallel/mesh.py `discover`)
    device_here: bool = True  # False: --print-config for a CUDA device this machine does not have


def launch_of(cfg: Config, *, preview: bool = False) -> Launch:
    """The launch this process is part of, from the launcher's environment (parallel/mesh.py's
    discovery, no rendezvous). preview (--print-config): run.device=cuda resolves for a GPU even
    on a machine without one, instead of refusing."""
    from distvit.parallel import mesh

    info = mesh.discover()
    mesh.Mesh.check(info.world_size, cfg.parallel.sp_size)  # sp_size divides the world (world = dp x sp)
    if preview and cfg.run.device == "cuda" and not torch.cuda.is_available():
        device, here = torch.device("cuda", info.local_rank), False
    else:
        device, here = mesh.pick_device(cfg.run.device, info.local_rank), True
    return Launch(info.world_size, info.world_size // cfg.parallel.sp_size, device, info.launcher, here)


def for_launch(cfg: Config, *, preview: bool = False) -> tuple[Config, str, Launch]:
    """cfg resolved for the launch this process is part of: (resolved copy, lr banner line, launch)."""
    launch = launch_of(cfg, preview=preview)
    resolved, line = resolve(cfg, dp_size=launch.dp_size, device=launch.device)
    return resolved, line, launch


def print_config(cfg: Config) -> str:
    """What `distvit train --print-config` prints: a comment header naming the launch, then the resolved YAML.

    The launch is this one: the world size from the launcher's environment (one process alone;
    `RANK=0 WORLD_SIZE=8` previews 8 ranks), the device from run.device (`--set run.device=cuda`
    resolves for a GPU without one here)."""
    try:
        resolved, line, launch = for_launch(cfg, preview=True)
    except ConfigError as e:
        if launch_of(cfg, preview=True).launcher != "single":
            raise
        # a recipe for many GPUs previewed as one process: say how to preview the launch it is for
        raise ConfigError(f"{e} (--print-config resolved for this launch, one process; preview N ranks "
                          "with RANK=0 WORLD_SIZE=N, a GPU launch with --set run.device=cuda)") from None
    sp = cfg.parallel.sp_size
    ranks = f"world size {launch.world_size}" + (f" (dp {launch.dp_size} x sp {sp})" if sp > 1 else "")
    head = [f"# resolved for device {launch.device.type}, {ranks}, launcher {launch.launcher}; {line}"]
    if not launch.device_here:
        head.append("# no CUDA device here: resolved as a GPU launch would be"
                    + (" (precision auto taken as bf16: Ampere or newer)" if cfg.parallel.precision == "auto" else ""))
    if launch.launcher == "single":
        head.append("# one process: preview N ranks with RANK=0 WORLD_SIZE=N, a GPU launch with --set run.device=cuda")
    return "\n".join(head) + "\n" + resolved.to_yaml()
