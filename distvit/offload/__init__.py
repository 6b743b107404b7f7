"""Optimizer-state offload for ZeRO-3 (design and numbers: README.md beside this file).

One public face:
    Settings   the mode (none | cpu | partial | interleaved) and its knobs; `Settings.ds_fragment`
               is the only place a mode becomes DeepSpeed config (parallel/deepspeed_config.py calls it)
    enable     install interleaved offload on a ZeRO-3 + CPU-offload engine; returns the handle
    stats      a handle's numbers for the metrics row (metrics.csv), {} without interleaved offload
Everything else (`_model`, `_schedule`, `_replan`, `_backend`, `_kernels`, `_calibrate`) is private.
Importing this package does not import torch (distvit.config imports MODES from it).
"""
from __future__ import annotations

from typing import Any

from distvit.offload._settings import MODES, Settings

__all__ = ["MODES", "Settings", "enable", "stats"]

# metrics.csv columns (engine/metrics.py COLUMNS lists the same names)
STATS_COLUMNS = ("offload_device_fraction", "offload_predicted_update_s", "offload_measured_update_s", "offload_replans")


def enable(engine, settings: Settings | None = None, *, logger: Any = None, rates=None):
    """Install interleaved offload; call right after deepspeed.initialize (see _interleaved.enable)."""
    from distvit.offload._interleaved import enable as _enable

    return _enable(engine, settings, logger=logger, rates=rates)


def stats(handle) -> dict[str, Any]:
    """The metrics-row view of an interleaved-offload handle (None -> {}): plan and last step's update time."""
    if handle is None:
        return {}
    s = handle.stats()
    return dict(zip(STATS_COLUMNS, (s["device_fraction"], s["predicted_update_s"], s["measured_update_s"], s["replans"])))
