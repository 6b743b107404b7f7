"""`OffloadSettings` (exported as `distvit.offload.Settings`): the offload mode and its knobs, in one place.

Torch-free on purpose. MODES is distvit.choices.OFFLOAD_MODES, the tuple `parallel.offload` is
typed with, so the allowed values are the ones this package dispatches on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from distvit.choices import OFFLOAD_MODES as MODES
from distvit.offload._model import Fraction

Mode = Literal[MODES]
KERNELS = ("auto", "torch", "cpu_adam")


def check_fraction(gpu_fraction: Any, where: str) -> None:
    if gpu_fraction == "auto":
        return
    if isinstance(gpu_fraction, bool) or not isinstance(gpu_fraction, (int, float)) or not 0.0 <= gpu_fraction <= 1.0:
        raise ValueError(f"{where} must be 'auto' or a number in [0, 1], got {gpu_fraction!r}")


@dataclass(frozen=True)
class OffloadSettings:
    """mode: none | cpu | partial | interleaved (README.md beside this file).

    gpu_fraction: share of the optimizer state (by elements) updated on the device: `partial`
        keeps that share there for the whole run (DeepSpeed's ratio = 1 - gpu_fraction);
        `interleaved` places it each step, "auto" letting the performance model choose.
    The rest tune interleaved only:
    log_every: log predicted vs measured update time every N optimizer steps (0: never).
    max_resident: sub-groups whose buffers may sit on the device at once (2 = double buffering).
    kernel: device Adam; "auto" is "torch" on CUDA and "cpu_adam" (bitwise stock) on the CPU stand-in.
    drift_tolerance, patience: refit the model when measured and predicted update time differ by
        more than this share for this many steps in a row (_replan.Replanner).
    min_gain, max_replans: with "auto", move sub-groups only for an expected gain above this share
        of the current update time, and at most this many times in a run.
    """

    mode: Mode = "interleaved"
    gpu_fraction: Fraction = "auto"
    log_every: int = 50
    max_resident: int = 2
    drift_tolerance: float = 0.25
    patience: int = 3
    kernel: Literal["auto", "torch", "cpu_adam"] = "auto"
    min_gain: float = 0.1
    max_replans: int = 4

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"offload mode must be one of {', '.join(MODES)} (parallel.offload), got {self.mode!r}")
        check_fraction(self.gpu_fraction, "parallel.offload_gpu_fraction")
        if self.mode in ("none", "cpu") and self.gpu_fraction != "auto":
            raise ValueError(
                f"parallel.offload_gpu_fraction={self.gpu_fraction} has no effect with parallel.offload={self.mode}; "
                "use parallel.offload=interleaved (or partial), or leave the fraction at 'auto'"
            )
        if self.mode == "partial" and self.gpu_fraction == "auto":
            raise ValueError(
                "parallel.offload=partial keeps a fixed share of the state on the device and cannot choose it; "
                "set parallel.offload_gpu_fraction to a number in [0, 1] or use parallel.offload=interleaved"
            )
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 step, got {self.patience}")
        if self.max_replans < 0:
            raise ValueError(f"max_replans must be >= 0, got {self.max_replans}")
        if self.max_resident < 1:
            raise ValueError(f"max_resident must be >= 1 sub-group, got {self.max_resident}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be 'auto', 'torch' or 'cpu_adam', got {self.kernel!r}")

    @classmethod
    def from_config(cls, parallel: Any) -> "OffloadSettings":
        """From `cfg.parallel` (ParallelConfig): its offload and offload_gpu_fraction."""
        return cls(mode=parallel.offload, gpu_fraction=parallel.offload_gpu_fraction)

    def ds_fragment(self, sub_group_size: int | None = None) -> dict[str, Any]:
        """The `zero_optimization` fragment for this mode (merge it into the ZeRO section).

        The only place an offload mode becomes DeepSpeed config. `none` adds nothing;
        `interleaved` looks like stock `cpu` to DeepSpeed (the fraction is applied by `enable`);
        `partial` becomes `offload_optimizer.ratio = 1 - gpu_fraction` (the CPU share).
        sub_group_size: also set ZeRO-3's sub_group_size (elements) when given.
        """
        fragment: dict[str, Any] = {}
        if sub_group_size is not None:
            if isinstance(sub_group_size, bool) or not isinstance(sub_group_size, int) or sub_group_size < 1:
                raise ValueError(f"parallel.sub_group_size must be a positive integer (elements), got {sub_group_size!r}")
            fragment["sub_group_size"] = sub_group_size
        if self.mode == "none":
            return fragment
        import torch

        ratio = 1.0 - float(self.gpu_fraction) if self.mode == "partial" else 1.0
        fragment["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available(), "ratio": ratio}
        return fragment


Settings = OffloadSettings
