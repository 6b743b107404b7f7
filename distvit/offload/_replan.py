"""When and how interleaved offload revises its plan from what the steps measured.

The model (`_model`) is fed start-up speeds timed on scratch tensors. Inside the real step
loop a sub-group also pays Python and DeepSpeed's own work around each call, and the step pays a
fixed cost no placement changes; so the first measured steps differ from the prediction. A naive
"refit and choose again" then flips between placements: the side that just ran is refit to its
slower in-loop speed, the other side keeps its flattering scratch speed and wins the next choice,
and so on (measured on 2 CPU ranks: 100% <-> 0% of the sub-groups every 3 steps).

`Replanner` settles instead:
- speeds measured in the loop are kept per resource across re-plans (`seen`); only resources
  never measured there are timed again on scratch tensors;
- the fixed per-step overhead is fitted to the measured steps (`_model.fit_overhead`),
  so the current placement's prediction matches what it measured;
- every placement that has run is filed with its measured median update time and judged by
  that, never by the model: a placement measured worse is not chosen again;
- `auto` changes placement only for an expected gain above `min_gain`, and at most
  `max_replans` times; after that, drift only refreshes the prediction.
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace
from statistics import median
from typing import Callable

from distvit.offload._model import Plan, Rates, fit_overhead, make_plan, refit, simulate
from distvit.offload._schedule import StepRecord, measured_rates
from distvit.offload._settings import Settings

# resources each side of the step loop uses: a side whose speeds were all measured in the loop
# needs no scratch re-timing
CPU_SIDE = ("cpu_adam", "param_write")
DEVICE_SIDE = ("h2d", "device_adam", "d2h")


class Replanner:
    """Holds the plan; `observe` each step's record, it says when it refit or moved sub-groups."""

    def __init__(self, sizes: tuple[int, ...], settings: Settings, rates: Rates, *, param_bytes: int,
                 memory_budget: float, recalibrate: Callable[[], Rates] | None = None):
        self.sizes = sizes
        self.settings = settings
        self.fraction = settings.gpu_fraction
        self.rates = rates
        self.param_bytes = param_bytes
        self.max_resident = settings.max_resident
        self.memory_budget = memory_budget
        self.drift_tolerance = settings.drift_tolerance
        self.patience = settings.patience
        self.min_gain = settings.min_gain
        self.max_replans = settings.max_replans
        self.recalibrate = recalibrate
        self.scratch = rates  # the latest speeds timed on scratch tensors: the prior of in-loop fits
        self.seen: dict[str, float] = {}  # speeds measured in the loop, latest window per resource
        self.measured: dict[tuple[int, int], float] = {}  # placement -> median update seconds of its latest window
        self.window: deque[StepRecord] = deque(maxlen=self.patience)  # steps since the last refit
        self.replans = 0  # placement changes
        self.refits = 0  # drift-triggered refits, whether or not the placement changed
        self.drifting = 0
        self.plan = self._make_plan()

    def _make_plan(self, *, keep: tuple[int, int] | None = None) -> Plan:
        return make_plan(self.sizes, self.fraction, self.rates, param_bytes=self.param_bytes,
                         max_resident=self.max_resident, memory_budget=self.memory_budget,
                         measured=self.measured, keep=keep, min_gain=self.min_gain)

    @property
    def may_move(self) -> bool:
        """Whether a drift may still change the placement (only `auto`, at most `max_replans` times)."""
        return self.fraction == "auto" and self.replans < self.max_replans

    # -- per step -------------------------------------------------------------------------------
    def observe(self, rec: StepRecord) -> str | None:
        """Account one step's update phase; returns a message when the model was refit."""
        self.window.append(rec)
        predicted = self.plan.predicted_s
        drift = abs(rec.wall_s - predicted) / predicted if predicted > 0 else 0.0
        self.drifting = self.drifting + 1 if drift > self.drift_tolerance else 0
        if self.drifting < self.patience:
            return None
        return self.refit(f"measured {rec.wall_s * 1e3:.2f} ms vs predicted {predicted * 1e3:.2f} ms "
                          f"for {self.patience} steps")

    # -- refit and re-plan ----------------------------------------------------------------------
    def refit(self, reason: str) -> str:
        """Refit speeds and overhead to the window, file its time under the placement, maybe move."""
        window = list(self.window)
        ran = measured_rates(window).keys()
        unseen = [name for name in CPU_SIDE + DEVICE_SIDE if name not in self.seen and name not in ran]
        if self.may_move and unseen and self.recalibrate is not None:
            # a side that has not run in the loop yet: time it again rather than trust a
            # start-up number that may have been wrong; its in-loop speed replaces this once it runs
            self.scratch = self.recalibrate()
        if window:
            self.seen.update(measured_rates(window, prior=self.scratch))
            self.measured[self.plan.placement] = median(r.wall_s for r in window)
        rates = refit(self.scratch, self.seen, weight=1.0)
        if window:
            rates = fit_overhead(self.plan, rates, self.measured[self.plan.placement], self.param_bytes)
        self.rates = rates
        self.refits += 1
        return self._choose(reason, forced=False)

    def shrink_memory(self, memory_budget: float, reason: str) -> str:
        """The slots no longer fit: choose again within `memory_budget`, past any limit (it must move)."""
        self.memory_budget = memory_budget
        return self._choose(reason, forced=True)

    def _choose(self, reason: str, *, forced: bool) -> str:
        old = self.plan
        if forced or self.may_move:
            new = self._make_plan(keep=None if forced else old.placement)
        else:  # same placement; its prediction becomes what it measured (or the refit model)
            new = replace(old, predicted_s=self._expected(old), measured=old.placement in self.measured,
                          predicted_cpu_only_s=self._expected_cpu_only())
        self.plan = new
        self.window.clear()
        self.drifting = 0
        if new.placement != old.placement:
            self.replans += 1
            message = f"re-planned ({reason}): {old.device_fraction:.0%} -> {new.describe()}"
            if self.fraction == "auto" and self.replans >= self.max_replans:
                message += (f"; that was re-plan {self.replans} of max_replans={self.max_replans}: this placement "
                            "stays, later drift only refreshes its prediction")
            return message
        return f"offload model refit ({reason}): placement kept, {new.describe()}"

    def _expected(self, plan: Plan) -> float:
        if plan.placement in self.measured:
            return self.measured[plan.placement]
        return simulate(plan.sizes, plan.on_device, plan.resident, self.rates, self.param_bytes)

    def _expected_cpu_only(self) -> float:
        if (0, 0) in self.measured:
            return self.measured[(0, 0)]
        return simulate(self.sizes, (), 0, self.rates, self.param_bytes)
