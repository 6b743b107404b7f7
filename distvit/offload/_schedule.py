"""The interleaved schedule inside DeepSpeed's ZeRO-3 step loop.

`DeepSpeedZeroOptimizer_Stage3.step()` walks the sub-groups and, for each, calls
`_prepare_sub_group` -> `unscale_and_clip_grads` -> `_optimizer_step` ->
`_reassign_or_swap_out_partitioned_parameters` -> `_release_sub_group`, then `_post_step`.
`InterleavedZero3Hooks` overrides exactly those methods (the optimizer object's class is swapped
for a subclass, nothing is rebuilt or forked). A CPU sub-group runs DeepSpeed's own code; a
device sub-group is handed to `SubGroupPipeline`:

    loop start   : slots allocated; the first `resident` device sub-groups start loading (H2D)
    unscale      : the loaded grad is scaled on the device (same factor DeepSpeed uses)
    optimizer    : device Adam on the slot, `state['step'] += 1` on the host as DeepSpeedCPUAdam does
    reassign     : the bf16/fp16 (or fp32) parameter partition is written from the device copy
    release      : D2H of param, exp_avg, exp_avg_sq into DeepSpeed's host tensors; the next
                   device sub-group starts loading into the freed slot
    _post_step   : wait for every D2H, so the host state is whole before anything reads it
                   (persistent-parameter all-gather, checkpoints, the next step)

Host tensors stay DeepSpeed's (`fp32_partitioned_groups_flat[i]`, its `.grad`, and
`optimizer.state[...]`), so checkpoints, zero_to_fp32 and a switch back to stock offload see
nothing new. The host copy of the *gradient* of a device sub-group is left unscaled (the scaled
copy lived on the device); the next backward overwrites it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from distvit.offload._model import D2H_BYTES_PER_ELEMENT, H2D_BYTES_PER_ELEMENT


def deepspeed_unscale_factor(zero_opt, total_norm):
    """The factor `DeepSpeedZeroOptimizer_Stage3.unscale_and_clip_grads` multiplies the grads by.

    Mirrors DeepSpeed 0.19's formula (loss scale, then clipping by the global norm); the
    equivalence test runs with clipping on, so a change there shows up as a mismatch.
    """
    combined_scale = zero_opt.loss_scale
    if zero_opt.clip_grad > 0.0:
        clip = ((total_norm / zero_opt.loss_scale) + 1e-6) / zero_opt.clip_grad
        clip = torch.clamp(clip, min=1.0)
        combined_scale = clip * zero_opt.loss_scale
    return 1.0 / combined_scale


@dataclass
class _Slot:
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    loaded: object = None  # event: this occupant's H2D is done
    updated: object = None  # event: this occupant's Adam and parameter write are done
    free: object = None  # event: the last D2H out of this slot is done


@dataclass
class StepRecord:
    """What one step's update phase did, in seconds of each resource."""

    wall_s: float = 0.0
    cpu_adam_s: float = 0.0
    cpu_adam_elements: int = 0
    param_write_s: float = 0.0
    param_write_bytes: int = 0
    h2d_s: float = 0.0
    h2d_bytes: int = 0
    device_adam_s: float = 0.0
    device_adam_elements: int = 0
    d2h_s: float = 0.0
    d2h_bytes: int = 0
    device_groups: int = 0
    events: list = field(default_factory=list)  # (kind, start, end, n) resolved at finish
    calls: list = field(default_factory=list)  # (Rates speed name, amount, seconds) per sub-group call


_RATE_FIELDS = {  # Rates field -> (amount, seconds) fields of StepRecord
    "cpu_adam": ("cpu_adam_elements", "cpu_adam_s"),
    "param_write": ("param_write_bytes", "param_write_s"),
    "h2d": ("h2d_bytes", "h2d_s"),
    "device_adam": ("device_adam_elements", "device_adam_s"),
    "d2h": ("d2h_bytes", "d2h_s"),
}
SIZE_SPREAD = 4.0  # calls must differ this much in size before a per-call cost is fitted (noise)


def _per_call_fit(samples: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(seconds per call, amount per second) of t = a + n / rate by least squares; None if not identifiable.

    Needs calls of different sizes (DeepSpeed's last sub-group of a parameter group is smaller than
    the rest); a negative cost or speed (noise) is no fit either.
    """
    sizes = [n for n, _ in samples]
    if len(samples) < 2 or max(sizes) < SIZE_SPREAD * min(sizes):
        return None
    mean_n = sum(sizes) / len(sizes)
    mean_t = sum(t for _, t in samples) / len(samples)
    var = sum((n - mean_n) ** 2 for n in sizes)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in samples) / var
    per_call = mean_t - slope * mean_n
    if slope <= 0 or per_call < 0:
        return None
    return per_call, 1.0 / slope


def measured_rates(records, prior=None) -> dict[str, float]:
    """Speeds and per-call costs seen over some steps, as `_model.Rates` field values.

    With calls of different sizes the fixed cost per call is fitted apart from the speed
    (`<name>_call_s`). Otherwise, given `prior` (Rates timed on large scratch tensors), the speed
    is taken from it and what the calls took beyond it becomes the per-call cost: so a window of
    small sub-groups, whose time is mostly that cost, does not make large ones look slow. Without
    a prior (or when the loop ran faster than it) the speed is total amount / total time.
    A resource that did no work in these steps (no device sub-groups, say) is left out.
    """
    out = {}
    for rate, (amount_field, seconds_field) in _RATE_FIELDS.items():
        amount = sum(getattr(r, amount_field) for r in records)
        seconds = sum(getattr(r, seconds_field) for r in records)
        if not (amount and seconds > 0):
            continue
        samples = [(n, t) for r in records for name, n, t in r.calls if name == rate]
        fit = _per_call_fit(samples)
        if fit is not None:
            out[f"{rate}_call_s"], out[rate] = fit
            continue
        out[rate] = amount / seconds
        if not samples:
            continue
        out[f"{rate}_call_s"] = 0.0  # measured calls whose cost could not be split: the speed carries it all
        if prior is not None:
            extra = (seconds - amount / getattr(prior, rate)) / len(samples)
            if extra > 0:
                out[rate], out[f"{rate}_call_s"] = getattr(prior, rate), extra
    return out


class SubGroupPipeline:
    """Device side of one optimizer step: bounded slots, prefetch, update, write-back."""

    def __init__(self, zero_opt, backend, kernel):
        self.opt = zero_opt
        self.backend = backend
        self.kernel = kernel
        self.active = False
        self.index: dict[int, int] = {}

    # -- step boundaries -------------------------------------------------------------------
    def begin(self, on_device: tuple[int, ...], resident: int) -> None:
        self.order = list(on_device)
        self.index = {i: k for k, i in enumerate(self.order)}
        self.record = StepRecord(device_groups=len(self.order))
        self.active = True
        self._t0 = time.perf_counter()
        if not self.order:
            self.slots = []
            return
        for i in self.order:
            self._ensure_host_state(i)
        capacity = max(self._numel(i) for i in self.order)
        self.slots = [self._new_slot(capacity) for _ in range(min(resident, len(self.order)))]
        # gradients reached the host by non-blocking copies on the current stream during backward,
        # and the model's parameter partitions may still be read there
        self.backend.wait_for_current(self.backend.h2d_stream)
        self.backend.wait_for_current(self.backend.update_stream)
        for k in range(len(self.slots)):
            self._load(k)

    def finish(self) -> StepRecord:
        b = self.backend
        for slot in self.slots:
            if slot.free is not None:
                b.synchronize(slot.free)
        b.join_current(self.backend.update_stream)
        rec = self.record
        for kind, start, end, amount in rec.events:
            seconds = b.elapsed_s(start, end)
            if kind == "h2d":
                rec.h2d_s += seconds
                rec.h2d_bytes += amount
            elif kind == "device_adam":
                rec.device_adam_s += seconds
                rec.device_adam_elements += amount
            else:
                rec.d2h_s += seconds
                rec.d2h_bytes += amount
            rec.calls.append((kind, amount, seconds))
        rec.events = []
        rec.wall_s = time.perf_counter() - self._t0
        self.slots, self.index, self.active = [], {}, False  # slot memory goes back to the allocator
        return rec

    def on_device(self, sub_group_id: int) -> bool:
        return self.active and sub_group_id in self.index

    # -- CPU sub-groups (DeepSpeed's own code, timed) ----------------------------------------
    def timed_cpu_adam(self, sub_group_id: int, run) -> None:
        t = time.perf_counter()
        run()
        if self.active:
            seconds, n = time.perf_counter() - t, self._numel(sub_group_id)
            self.record.cpu_adam_s += seconds
            self.record.cpu_adam_elements += n
            self.record.calls.append(("cpu_adam", n, seconds))

    def timed_param_write(self, sub_group_id: int, run) -> None:
        t = time.perf_counter()
        run()
        if self.active:
            seconds = time.perf_counter() - t
            lp = self.opt.fp16_partitioned_groups_flat[sub_group_id]
            self.record.param_write_s += seconds
            self.record.param_write_bytes += lp.numel() * lp.element_size()
            self.record.calls.append(("param_write", lp.numel() * lp.element_size(), seconds))

    # -- device sub-groups ------------------------------------------------------------------
    def unscale(self, sub_group_id: int, factor) -> None:
        slot, n = self._slot_of(sub_group_id)
        with self.backend.on(self.backend.update_stream):
            self.backend.wait(self.backend.update_stream, slot.loaded)
            slot.grad[:n].mul_(factor)

    def update(self, sub_group_id: int) -> None:
        slot, n = self._slot_of(sub_group_id)
        fp32 = self.opt.fp32_partitioned_groups_flat[sub_group_id]
        state = self.opt.optimizer.state[fp32]
        group = self.opt.optimizer.param_groups[self.opt.sub_group_to_group_id[sub_group_id]]
        state["step"] += 1  # as DeepSpeedCPUAdam.step does before its kernel
        b = self.backend
        with b.on(b.update_stream):
            b.wait(b.update_stream, slot.loaded)
            start = b.record(b.update_stream)
            self.kernel(slot.param[:n], slot.grad[:n], slot.exp_avg[:n], slot.exp_avg_sq[:n], state["step"], group)
            end = b.record(b.update_stream)
        self.record.events.append(("device_adam", start, end, n))

    def write_params(self, sub_group_id: int) -> None:
        """Stock copies fp32 host -> model partition; here the device copy is already there."""
        slot, n = self._slot_of(sub_group_id)
        lp = self.opt.fp16_partitioned_groups_flat[sub_group_id]
        with self.backend.on(self.backend.update_stream):
            lp.data.copy_(slot.param[:n])
            slot.updated = self.backend.record(self.backend.update_stream)
        self.opt._unflatten_partitioned_parameters(sub_group_id)

    def write_back(self, sub_group_id: int) -> None:
        slot, n = self._slot_of(sub_group_id)
        fp32 = self.opt.fp32_partitioned_groups_flat[sub_group_id]
        state = self.opt.optimizer.state[fp32]
        b = self.backend
        with b.on(b.d2h_stream):
            b.wait(b.d2h_stream, slot.updated)
            start = b.record(b.d2h_stream)
            b.copy(fp32.data, slot.param[:n])
            b.copy(state["exp_avg"], slot.exp_avg[:n])
            b.copy(state["exp_avg_sq"], slot.exp_avg_sq[:n])
            slot.free = b.record(b.d2h_stream)
        self.record.events.append(("d2h", start, slot.free, n * D2H_BYTES_PER_ELEMENT))
        k = self.index[sub_group_id] + len(self.slots)
        if k < len(self.order):
            self._load(k)

    # -- internals --------------------------------------------------------------------------
    def _numel(self, sub_group_id: int) -> int:
        return self.opt.fp32_partitioned_groups_flat[sub_group_id].numel()

    def _new_slot(self, capacity: int) -> _Slot:
        flat = self.backend.empty(4 * capacity, torch.float32)
        parts = flat.split(capacity)
        return _Slot(*parts)

    def _slot_of(self, sub_group_id: int) -> tuple[_Slot, int]:
        return self.slots[self.index[sub_group_id] % len(self.slots)], self._numel(sub_group_id)

    def _ensure_host_state(self, sub_group_id: int) -> None:
        """DeepSpeedCPUAdam's lazily created state, made before the prefetch needs it; pinned on CUDA."""
        fp32 = self.opt.fp32_partitioned_groups_flat[sub_group_id]
        state = self.opt.optimizer.state[fp32]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(fp32.data, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(fp32.data, dtype=torch.float32)
        b = self.backend
        # a checkpoint load or a fresh optimizer may hand us pageable tensors: DMA needs pinned ones
        if not b.is_pinned(fp32.data):
            fp32.data = b.pinned(fp32.data)
        if not b.is_pinned(fp32.grad):
            fp32.grad = b.pinned(fp32.grad)
        for key in ("exp_avg", "exp_avg_sq"):
            if not b.is_pinned(state[key]):
                state[key] = b.pinned(state[key])

    def _load(self, k: int) -> None:
        sub_group_id = self.order[k]
        slot = self.slots[k % len(self.slots)]
        n = self._numel(sub_group_id)
        fp32 = self.opt.fp32_partitioned_groups_flat[sub_group_id]
        state = self.opt.optimizer.state[fp32]
        b = self.backend
        with b.on(b.h2d_stream):
            if slot.free is not None:
                b.wait(b.h2d_stream, slot.free)  # the previous occupant's D2H must have left
            start = b.record(b.h2d_stream)
            b.copy(slot.param[:n], fp32.data)
            b.copy(slot.grad[:n], fp32.grad)
            b.copy(slot.exp_avg[:n], state["exp_avg"])
            b.copy(slot.exp_avg_sq[:n], state["exp_avg_sq"])
            slot.loaded = b.record(b.h2d_stream)
        self.record.events.append(("h2d", start, slot.loaded, n * H2D_BYTES_PER_ELEMENT))


class InterleavedZero3Hooks:
    """Mixed in front of DeepSpeedZeroOptimizer_Stage3 by `distvit.offload.enable`.

    `self._interleaved` is the controller (distvit.offload._interleaved.InterleavedOffload); it owns the
    plan and the `SubGroupPipeline`.
    """

    def _prepare_sub_group(self, sub_group_id, timer_names):
        self._interleaved._loop_started()
        super()._prepare_sub_group(sub_group_id, timer_names)

    def unscale_and_clip_grads(self, sub_group_id, total_norm):
        pipe = self._interleaved.pipeline
        if pipe.on_device(sub_group_id):
            pipe.unscale(sub_group_id, deepspeed_unscale_factor(self, total_norm))
        else:
            super().unscale_and_clip_grads(sub_group_id, total_norm)

    def _optimizer_step(self, sub_group_id):
        pipe = self._interleaved.pipeline
        if pipe.on_device(sub_group_id):
            pipe.update(sub_group_id)
        else:
            pipe.timed_cpu_adam(sub_group_id, lambda: super(InterleavedZero3Hooks, self)._optimizer_step(sub_group_id))

    def _reassign_or_swap_out_partitioned_parameters(self, sub_group_id):
        pipe = self._interleaved.pipeline
        if pipe.on_device(sub_group_id):
            pipe.write_params(sub_group_id)
        else:
            parent = super(InterleavedZero3Hooks, self)._reassign_or_swap_out_partitioned_parameters
            pipe.timed_param_write(sub_group_id, lambda: parent(sub_group_id))

    def _release_sub_group(self, sub_group_id, timer_names):
        super()._release_sub_group(sub_group_id, timer_names)
        pipe = self._interleaved.pipeline
        if pipe.on_device(sub_group_id):
            pipe.write_back(sub_group_id)

    def _post_step(self, timer_names):
        self._interleaved._loop_finished()
        super()._post_step(timer_names)
