"""Run metrics: a CSV file and TensorBoard in the run folder (rank 0), plus FLOPs and MFU.

The CSV is the durable record: one row per logged step with a fixed header. On resume, rows
past the resumed step (written by the interrupted run after its last checkpoint) are dropped,
so the file reads as one uninterrupted run; TensorBoard gets the same via purge_step.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from distvit.checkpoint.io import atomic_write_text

# Dense bf16 tensor-core peak (TFLOP/s) by device-name fragment; first match wins.
PEAK_TFLOPS_BF16 = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("MI300X", 1307.0),
]

COLUMNS = [
    "step", "epoch", "loss", "lr", "grad_norm", "img_per_s", "step_time_s", "tflops", "mfu",
    "peak_mem_gib", "bad_samples", "val_loss", "val_top1", "val_top5", "ema_val_top1",
    "val_top1_cls", "val_top1_dist",  # distilled models: each head alone (val_top1 is their average)
    "tokens_per_s", "val_mse", "ema_val_mse",  # task.kind=autoregressive (engine/tasks.py)
    "offload_device_fraction", "offload_predicted_update_s", "offload_measured_update_s", "offload_replans",  # distvit.offload.STATS_COLUMNS
    "pack_fill",  # data.packing: real patches / slots of the epoch's packed batches
]


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for frag, peak in PEAK_TFLOPS_BF16 if frag in name), None)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except Exception:
        return None


class MetricsWriter:
    """Writes metrics on rank 0 only; on other ranks every call is a no-op."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            self.csv.writeheader()
            self.file.flush()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: _fmt(v) for k, v in row.items()})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k if k.startswith("val") or k.startswith("ema") else f"train/{k}", v, row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    if isinstance(v, float):
        return repr(v)  # full precision: the CSV is compared bitwise across resumes
    return "" if v is None else v
