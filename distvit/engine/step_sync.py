"""Loss, NaN check and preemption flag without a host sync per step.

Each optimizer step hands its micro-batch losses (device scalars, no copy, no sync) to
`StepSync.add`. On a *read step* (log, eval and save steps and the last step; `Trainer.fit` decides)
`StepSync.read` packs what the host needs into one small device tensor and all-reduces it over all
ranks in one collective (through distvit.parallel.comm, on the group's device):

    [last step's loss (sp rank 0 of each dp replica), non-finite losses in the window (every rank),
     preemption requested (every rank), bad samples (sp rank 0)]

and the host reads it once. Between read steps nothing leaves the device.

Semantics:
- the logged loss is the *last step's* loss, averaged over the dp ranks (the same number the
  trainer logged before; a resumed run logs exactly what the uninterrupted one did);
- a non-finite loss on any rank at any step of the window stops every rank at the read step,
  which comes before any save or evaluation: no checkpoint stores it. The error names the first bad step
  (a second, small all-reduce that runs only on that path);
- a preemption signal is honoured at the next read step (at most `log.every_steps` steps later).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distvit.parallel import comm


@dataclass(frozen=True)
class Reading:
    loss: float  # the last step's loss, mean over dp replicas
    stop: bool  # some rank asked to stop (preemption signal)
    bad_samples: int  # corrupt samples skipped so far, summed over dp replicas
    first_bad: tuple[int, str] | None  # (step, "nan" | "inf"): first non-finite loss on any rank, or None
    steps: int  # steps in the window this reading closes


class StepSync:
    def __init__(self, device: torch.device, *, dp_size: int, sp_rank: int = 0, group=None):
        self.device, self.dp_size, self.sp_rank, self.group = device, dp_size, sp_rank, group
        self._window: list[tuple[int, list[torch.Tensor]]] = []

    def add(self, step: int, micro_losses: list[torch.Tensor]) -> None:
        """One optimizer step's micro-batch losses (detached device scalars); no sync."""
        self._window.append((step, micro_losses))

    def read(self, *, stop_requested: bool, bad_samples: int = 0) -> Reading:
        """The fused all-reduce and the one host read; closes the window."""
        window, self._window = self._window, []
        steps = [s for s, _ in window]
        if window:
            per_step = torch.stack([torch.stack(m).double().mean() for _, m in window]).to(self.device)
        else:
            per_step = torch.zeros(1, dtype=torch.float64, device=self.device)
        finite = torch.isfinite(per_step)
        lead = self.sp_rank == 0  # sp replicas hold the same loss and data: count each dp replica once
        host = torch.tensor([float(stop_requested), float(bad_samples if lead else 0)], dtype=torch.float64)
        buf = torch.cat([
            (per_step[-1:] if lead else torch.zeros_like(per_step[-1:])),
            (~finite).sum().double().reshape(1),
            host.to(self.device, non_blocking=True),
        ])
        comm.all_reduce(buf, "sum", self.group)
        loss_sum, nonfinite, stop, bad = buf.tolist()  # the one host sync of the window
        first_bad = self._first_bad(per_step, finite, steps) if nonfinite else None
        return Reading(loss=loss_sum / self.dp_size, stop=stop > 0, bad_samples=int(round(bad)),
                       first_bad=first_bad, steps=len(window))

    def _first_bad(self, per_step: torch.Tensor, finite: torch.Tensor, steps: list[int]) -> tuple[int, str]:
        """Agree on the first non-finite step over all ranks (only runs when there is one)."""
        key = float("inf")
        for i in (~finite).nonzero().flatten().tolist():
            key = 2.0 * steps[i] + (0.0 if torch.isnan(per_step[i]) else 1.0)  # a NaN wins over an inf at one step
            break
        t = torch.tensor([key], dtype=torch.float64, device=self.device)
        comm.all_reduce(t, "min", self.group)
        key = t.item()
        return int(key // 2), ("nan" if key % 2 == 0 else "inf")
