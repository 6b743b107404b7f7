"""Performance model of the ZeRO-3 update phase: which sub-groups to update on the device.

The model is a small event simulator of the per-sub-group step loop that
`distvit.offload._schedule` runs, fed with measured rates:

- the host walks the sub-groups in DeepSpeed's order; a CPU sub-group keeps it busy for
  CPU Adam plus the fp32 -> bf16/fp16 parameter copy to the device (both synchronous);
  a device sub-group costs it only the time to enqueue work;
- a device sub-group moves through three streams in order: H2D (fp32 param, grad, exp_avg,
  exp_avg_sq: 16 B/element), device Adam, D2H (param, exp_avg, exp_avg_sq: 12 B/element);
  a slot (one sub-group's device buffers) is reused only after its D2H has finished, so at
  most `resident` sub-groups hold device memory at once;
- the step ends when the host is done and the last D2H has landed.

Device sub-groups are a prefix of the loop order: the host then enqueues them all at once and
spends the rest of the loop in CPU Adam while the copy engines and the device work beside it.
With `concurrent=False` (the CPU stand-in for a device) every operation runs on the host one
after another, so the model sees that moving work to the "device" cannot pay off there.

On top of the simulated loop every step pays `Rates.step_overhead_s`: host time that does not
depend on the placement (DeepSpeed's loop around the hooks, its timers, Python, the hooks' own
bookkeeping). Start-up calibration cannot see it; `fit_overhead` sets it from measured steps so
that the model predicts what a step really takes. Placements that have already run are compared
by their measured times, not by the model (`make_plan(measured=...)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Mapping, Sequence

H2D_BYTES_PER_ELEMENT = 16  # fp32 master param + fp32 grad + exp_avg + exp_avg_sq
D2H_BYTES_PER_ELEMENT = 12  # fp32 master param + exp_avg + exp_avg_sq (the grad is not needed back)
SLOT_BYTES_PER_ELEMENT = 16  # device buffers of one resident sub-group

Fraction = float | Literal["auto"]
SPEEDS = ("cpu_adam", "device_adam", "h2d", "d2h", "param_write")
CALL_COSTS = tuple(f"{name}_call_s" for name in SPEEDS)


@dataclass(frozen=True)
class Rates:
    """Measured speeds of one rank. Elements or bytes per second; `issue_s` per device sub-group."""

    cpu_adam: float  # elements/s of DeepSpeedCPUAdam
    device_adam: float  # elements/s of the device Adam kernel
    h2d: float  # bytes/s, pinned host -> device
    d2h: float  # bytes/s, device -> pinned host
    param_write: float  # bytes/s of the stock fp32 (host) -> param dtype (device) copy of a CPU sub-group
    concurrent: bool  # device streams run beside the host (CUDA) or not (CPU stand-in)
    issue_s: float = 0.0  # host time to enqueue one device sub-group
    step_overhead_s: float = 0.0  # per-step host time the placement does not change (fitted, see fit_overhead)
    # fixed seconds per call of each resource on top of amount / speed (Python and DeepSpeed around
    # the kernel); 0 from calibration, fitted in the loop (_schedule.measured_rates)
    cpu_adam_call_s: float = 0.0
    device_adam_call_s: float = 0.0
    h2d_call_s: float = 0.0
    d2h_call_s: float = 0.0
    param_write_call_s: float = 0.0

    def __post_init__(self):
        for name in SPEEDS:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Rates.{name} must be a positive finite speed, got {value!r}")
        for name in ("issue_s", "step_overhead_s", *CALL_COSTS):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Rates.{name} must be a finite time >= 0 s, got {value!r}")


@dataclass(frozen=True)
class Plan:
    """Where each sub-group's optimizer step runs during one step, and what the model expects."""

    sizes: tuple[int, ...]  # elements per sub-group on this rank, DeepSpeed's order
    on_device: tuple[int, ...]  # sub-group ids updated on the device (a prefix of the order)
    resident: int  # sub-groups allowed on the device at once (slots)
    predicted_s: float  # predicted update-phase time of this plan
    predicted_cpu_only_s: float  # predicted time with every sub-group on CPU Adam (stock offload)
    fraction: Fraction  # what was asked for
    measured: bool = False  # predicted_s is this placement's measured time rather than the model's

    @property
    def placement(self) -> tuple[int, int]:
        """(device sub-groups, resident slots): what a measured time is filed under."""
        return len(self.on_device), self.resident

    @property
    def device_fraction(self) -> float:
        total = sum(self.sizes)
        return sum(self.sizes[i] for i in self.on_device) / total if total else 0.0

    @property
    def slot_bytes(self) -> int:
        """Device memory the resident slots take during the update phase."""
        largest = max((self.sizes[i] for i in self.on_device), default=0)
        return self.resident * SLOT_BYTES_PER_ELEMENT * largest

    def describe(self) -> str:
        n, d = len(self.sizes), len(self.on_device)
        ids = _ranges(self.on_device) if d else "none"
        speedup = self.predicted_cpu_only_s / self.predicted_s if self.predicted_s > 0 else float("nan")
        return (
            f"interleaved offload plan ({self.fraction!r}): {d}/{n} sub-groups on the device [{ids}] "
            f"= {self.device_fraction:.0%} of {sum(self.sizes):,} elements, {self.resident} resident "
            f"({self.slot_bytes / 2**20:.1f} MiB); {'measured' if self.measured else 'predicted'} update "
            f"{self.predicted_s * 1e3:.2f} ms vs {self.predicted_cpu_only_s * 1e3:.2f} ms all-CPU ({speedup:.2f}x)"
        )


def _ranges(ids: Sequence[int]) -> str:
    out, start, prev = [], ids[0], ids[0]
    for i in list(ids[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def simulate(sizes: Sequence[int], on_device: Sequence[int], resident: int, rates: Rates, param_bytes: int) -> float:
    """Predicted seconds of the step loop for one placement (see the module docstring)."""
    device_set = set(on_device)
    order = [i for i in range(len(sizes)) if i in device_set]
    if order and resident < 1:
        raise ValueError(f"resident must be >= 1 when sub-groups run on the device, got {resident}")
    r = rates

    def h2d(n):
        return r.h2d_call_s + n * H2D_BYTES_PER_ELEMENT / r.h2d

    def update(n):
        return r.device_adam_call_s + n / r.device_adam

    def d2h(n):
        return r.d2h_call_s + n * D2H_BYTES_PER_ELEMENT / r.d2h

    def cpu(n):
        return r.cpu_adam_call_s + n / r.cpu_adam + r.param_write_call_s + n * param_bytes / r.param_write

    host = 0.0
    if not rates.concurrent:
        for i, n in enumerate(sizes):
            host += (r.issue_s + h2d(n) + update(n) + d2h(n)) if i in device_set else cpu(n)
        return host + rates.step_overhead_s

    h2d_free = update_free = d2h_free = 0.0
    slot_free = [0.0] * max(resident, 1)
    issued = {k: 0.0 for k in range(min(resident, len(order)))}  # the first slots load at loop start
    k = 0
    for i, n in enumerate(sizes):
        if i not in device_set:
            host += cpu(n)
            continue
        slot = k % resident
        h2d_start = max(issued[k], h2d_free, slot_free[slot])
        h2d_free = h2d_start + h2d(n)
        host += rates.issue_s
        update_start = max(h2d_free, update_free, host)
        update_free = update_start + update(n)
        d2h_start = max(update_free, d2h_free)
        d2h_free = d2h_start + d2h(n)
        slot_free[slot] = d2h_free
        if k + resident < len(order):
            issued[k + resident] = host  # the next occupant of this slot is enqueued after this release
        k += 1
    # the overhead is added, not overlapped: it is fitted the same way (fit_overhead), so whatever
    # part of it really overlaps the device pipeline is already netted out of the fitted value
    return max(host, d2h_free) + rates.step_overhead_s


def prefix_for_fraction(sizes: Sequence[int], fraction: float) -> int:
    """Number of leading sub-groups whose share of the elements is closest to `fraction`."""
    total = sum(sizes)
    target = fraction * total
    best, best_gap, cum = 0, abs(target), 0
    for m, n in enumerate(sizes, start=1):
        cum += n
        if abs(cum - target) < best_gap - 1e-9:
            best, best_gap = m, abs(cum - target)
    return best


def resident_that_fits(sizes: Sequence[int], prefix: int, max_resident: int, memory_budget: float) -> int:
    """Slots that fit in `memory_budget` bytes for the first `prefix` sub-groups (0 if not even one)."""
    if prefix == 0:
        return 0
    slot = SLOT_BYTES_PER_ELEMENT * max(sizes[:prefix])
    return int(min(max_resident, prefix, memory_budget // slot))


def make_plan(
    sizes: Sequence[int],
    fraction: Fraction,
    rates: Rates,
    *,
    param_bytes: int,
    max_resident: int,
    memory_budget: float,
    measured: Mapping[tuple[int, int], float] | None = None,
    keep: tuple[int, int] | None = None,
    min_gain: float = 0.0,
) -> Plan:
    """Choose the device sub-groups: the asked fraction, or with "auto" the fastest prefix.

    measured: update-phase seconds already measured per placement ((device sub-groups, resident),
        see `Plan.placement`); such a placement is judged by its measurement, not by the model.
    keep: the placement in use; "auto" leaves it only for one expected to be faster by more than
        `min_gain` (a share of its time), so two placements within the noise never trade places.
    """
    sizes = tuple(int(n) for n in sizes)
    if max_resident < 1:
        raise ValueError(f"max_resident must be >= 1, got {max_resident}")
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain!r}")
    measured = measured or {}

    def candidate(prefix: int) -> tuple[float, int, bool] | None:
        """(expected seconds, resident slots, whether the seconds were measured), None if no slot fits."""
        resident = resident_that_fits(sizes, prefix, max_resident, memory_budget)
        if prefix and resident == 0:
            return None
        if (prefix, resident) in measured:
            return measured[(prefix, resident)], resident, True
        return simulate(sizes, range(prefix), resident, rates, param_bytes), resident, False

    cpu_only = candidate(0)
    if fraction == "auto":
        options = {0: cpu_only}
        best = 0
        for prefix in range(1, len(sizes) + 1):
            found = candidate(prefix)
            if found is None:
                continue
            options[prefix] = found
            # a device sub-group must buy a real gain (1%): timings of small groups are noisy
            if found[0] < options[best][0] * 0.99:
                best = prefix
        kept = keep[0] if keep is not None else None
        if kept in options and options[kept][1] == keep[1] and kept != best:
            if not options[best][0] < options[kept][0] * (1.0 - min_gain):
                best = kept
        prefix = best
        found = options[best]
    else:
        if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"gpu_fraction must be 'auto' or a number in [0, 1], got {fraction!r}")
        prefix = prefix_for_fraction(sizes, float(fraction))
        found = candidate(prefix)
        if found is None:
            need = SLOT_BYTES_PER_ELEMENT * max(sizes[:prefix])
            raise ValueError(
                f"gpu_fraction={fraction} needs one device slot of {need / 2**20:.1f} MiB (16 B x the largest "
                f"sub-group, {max(sizes[:prefix]):,} elements) but only {memory_budget / 2**20:.1f} MiB of device "
                "memory is free during the update; lower parallel.sub_group_size or use gpu_fraction='auto'"
            )
    predicted, resident, was_measured = found
    return Plan(sizes, tuple(range(prefix)), resident, predicted, cpu_only[0], fraction, measured=was_measured)


def fit_overhead(plan: Plan, rates: Rates, measured_s: float, param_bytes: int) -> Rates:
    """`rates` with the per-step overhead that makes the model predict `measured_s` for `plan`'s placement.

    What the simulated loop does not explain is taken as placement-independent (never below 0: a
    step faster than the model means the speeds are off, which `refit` corrects, not the overhead).
    """
    loop = simulate(plan.sizes, plan.on_device, plan.resident, replace(rates, step_overhead_s=0.0), param_bytes)
    return replace(rates, step_overhead_s=max(0.0, measured_s - loop))


def refit(rates: Rates, measured: Mapping[str, float], weight: float = 0.5) -> Rates:
    """Blend measured values (Rates field names; missing ones keep their value) into `rates`.

    Speeds must be positive and per-call costs >= 0 to be taken; anything else is ignored.
    """
    updates = {}
    for name, value in measured.items():
        usable = value > 0 if name in SPEEDS else value >= 0
        if usable and math.isfinite(value):
            old = getattr(rates, name)
            updates[name] = (1 - weight) * old + weight * value
    return replace(rates, **updates)
