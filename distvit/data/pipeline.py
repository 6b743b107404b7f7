"""What runs inside each DataLoader worker: plan -> raw samples -> shuffle block -> decode/augment -> uint8 batch.

Shuffling is by *blocks*: a worker reads `shuffle_buffer` raw samples of its share, permutes them with
a generator seeded by (seed, epoch, rank, worker, block), and emits them. webdataset's shuffle keeps a
sliding buffer whose content at any moment depends on every earlier draw; to resume it exactly one
would have to save the buffer (images) or replay the whole share. A block is re-created from its
first sample's position alone, so the cursor sent with each batch is a handful of integers:

    {"worker", "batches", "piece", "item", "block", "taken", "good", "bad", "overflow"}

and resuming re-reads at most one block (skipping, not decoding, the samples already taken).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distvit.data.errors import BadSample, BadSampleLog, DataError
from distvit.data.reader import PieceReader
from distvit.data.shards import Shard, WorkerPlan, batches_done, pieces_for_range, stable_rng, train_plan
from distvit.data.device import to_uint8_batch
from distvit.data.transforms import EvalTransform, TrainTransform, decode_crop, decode_label, sample_rng


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs, as plain picklable data (workers may be spawned)."""

    shards: tuple[Shard, ...]
    seed: int
    epoch: int
    dp_rank: int
    dp_size: int
    num_workers: int  # logical workers: max(1, DataLoader workers)
    batch_size: int
    steps: int
    shuffle: bool
    shuffle_buffer: int
    shard_split: str
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: float
    eval_crop_pct: float
    interpolation: str
    on_error: str
    max_logged_errors: int
    num_classes: int | None
    repeated_aug: int = 1  # DeiT's repeated augmentation: each sample on this many ranks per epoch
    augment: tuple = ()  # (auto_augment, color_jitter, three_augment, reprob, remode); () for none
    start_step: int = 0  # batches of this epoch the rank has already consumed
    cursors: tuple = field(default=())  # per logical worker: dict or None
    classes_from: str = "the manifest's classes"  # where num_classes came from, for the bad-label message
    todo: tuple | None = None  # the rest of an epoch resumed on another world size (data/remap.py)


def read_label(item: dict, s: StreamSpec) -> int:
    """The sample's class index; one outside [0, num_classes) is a bad sample (the model's head would
    raise IndexError on it), whether the bound came from the manifest or from the model."""
    label = decode_label(item, None)
    if s.num_classes is not None and label >= s.num_classes:
        raise BadSample(f"label {label} is out of range [0, {s.num_classes}) of {s.classes_from}")
    return label


def logical_worker(spec_start_step: int, num_workers: int) -> int:
    """DataLoader worker k serves logical worker (k + start_step) % W: the loader always asks worker 0
    first, and after `start_step` batches the next batch belongs to logical worker start_step % W."""
    info = get_worker_info()
    k = info.id if info is not None else 0
    return (k + spec_start_step) % num_workers


def _set_worker_threads() -> None:
    if get_worker_info() is not None:
        torch.set_num_threads(1)  # W workers x N threads would oversubscribe the cores


class TrainStream(IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self):
        _set_worker_threads()
        s = self.spec
        w = logical_worker(s.start_step, s.num_workers)
        plan = train_plan(list(s.shards), seed=s.seed, epoch=s.epoch, shuffle=s.shuffle, split=s.shard_split,
                          dp_rank=s.dp_rank, dp_size=s.dp_size, num_workers=s.num_workers,
                          batch_size=s.batch_size, steps=s.steps, repeats=s.repeated_aug, todo=s.todo)[w]
        cursor = s.cursors[w] if s.cursors else None
        return WorkerStream(s, w, plan, cursor).batches()


class WorkerStream:
    def __init__(self, spec: StreamSpec, worker: int, plan: WorkerPlan, cursor: dict | None):
        self.s, self.worker, self.plan = spec, worker, plan
        self.bad = BadSampleLog(spec.on_error, spec.max_logged_errors, f"rank {spec.dp_rank} worker {worker}")
        self.transform = TrainTransform(spec.img_size, spec.in_chans, spec.crop_scale, spec.crop_ratio,
                                        spec.hflip, spec.interpolation, spec.augment, spec.mean)
        done = batches_done(spec.start_step, worker, spec.num_workers)
        if cursor is None:
            if done:
                raise DataError(f"loader state has no cursor for worker {worker}, which had made {done} batches; "
                                "the state is from another loader version or was edited")
            cursor = {"worker": worker, "batches": 0, "piece": 0, "item": 0, "block": 0, "taken": 0,
                      "good": 0, "bad": 0, "overflow": 0}
        elif cursor["batches"] != done:
            raise DataError(f"loader state: worker {worker} cursor is at batch {cursor['batches']} but step "
                            f"{spec.start_step} implies {done}; the state is inconsistent")
        self.c = dict(cursor)
        self.bad.count = self.c["bad"]

    def _fill(self, reader: PieceReader) -> tuple[list[dict], tuple[int, int]]:
        start = reader.position
        block = []
        while len(block) < self.s.shuffle_buffer:
            item = reader.next_item()
            if item is None:
                break
            block.append(item)
        return block, start

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]]:
        s, c = self.s, self.c
        quota = self.plan.quota
        if c["good"] >= quota:
            return
        total = sum(sh.samples for sh in s.shards)
        images, labels, rngs = [], [], []
        resume = c["taken"] > 0 or c["batches"] > 0
        overflow = bool(c["overflow"])
        reader = self._reader(overflow, (c["piece"], c["item"]))
        taken_since_good = 0
        while True:
            # A replayed block's read errors were counted before the checkpoint; overflow: see below.
            self.bad.muted = resume or overflow
            block, start = self._fill(reader)
            self.bad.muted = False
            if not block:
                if overflow:  # cannot happen with an endless overflow, but never spin on it
                    raise DataError(f"rank {s.dp_rank} worker {self.worker}: the shards ran out of samples")
                overflow = True  # the share ran short (bad samples): continue after it
                reader = self._reader(True, (0, 0))
                c.update(piece=0, item=0, taken=0, overflow=1)
                continue
            c["piece"], c["item"] = start
            order = (stable_rng(s.seed, s.epoch, s.dp_rank, self.worker, c["block"], int(overflow)).permutation(len(block))
                     if s.shuffle else np.arange(len(block)))
            skip = c["taken"] if resume else 0
            resume = False
            # A bad sample met again in the overflow was counted (and logged) by the worker whose share
            # holds it: count each bad sample once per epoch (on_error=raise still raises).
            self.bad.muted = overflow
            for idx in order[skip:]:
                item = block[idx]
                c["taken"] += 1
                try:
                    # With repeated augmentation each rank draws its own augmentation of a shared sample.
                    key = item["__key__"] if s.repeated_aug == 1 else f"{item['__key__']}\0{s.dp_rank}"
                    rng = sample_rng(s.seed, s.epoch, item.get("__url__", ""), key)
                    img, box = decode_crop(item, s.in_chans, lambda w, h: self.transform.box(w, h, rng), s.img_size)
                    label = read_label(item, s)
                    images.append(self.transform(img, rng, box))
                    labels.append(label), rngs.append(rng)
                except BadSample as exc:
                    self.bad.report(item.get("__url__", "?"), item.get("__key__"), exc.reason)
                    taken_since_good += 1
                    if overflow and taken_since_good > total:
                        raise DataError(f"rank {s.dp_rank} worker {self.worker}: {taken_since_good} samples in a row "
                                        f"failed, more than the {total} of the whole epoch; check the shards with "
                                        f"`distvit data verify`") from None
                    continue
                taken_since_good = 0
                c["good"] += 1
                if len(images) == s.batch_size:
                    c["batches"] += 1
                    c["bad"] = self.bad.count
                    batch = to_uint8_batch(images)
                    yield (batch, torch.tensor(labels, dtype=torch.int64),
                           self.transform.erase_plan(rngs, batch.shape[1:]), dict(c))
                    images, labels, rngs = [], [], []
                    if c["good"] >= quota:
                        return
            c["block"] += 1  # the next block starts where this one's reading stopped
            c["taken"] = 0

    def _reader(self, overflow: bool, start: tuple[int, int]) -> PieceReader:
        pieces = self.plan.overflow() if overflow else iter(self.plan.primary)
        # Overflow is endless: if a whole cycle of shards yields nothing, stop instead of spinning.
        return PieceReader(pieces, self.bad, start, max_empty_pieces=2 * len(self.s.shards) + 2)


class ValStream(IterableDataset):
    """Validation: each logical worker reads a contiguous slice of the rank's samples in tar order and
    yields `batches` batches; slots past the slice (or of samples that failed) are padding, valid=False."""

    def __init__(self, spec: StreamSpec, slices: list[tuple[int, int, int]]):
        super().__init__()
        self.spec, self.slices = spec, slices

    def __iter__(self):
        _set_worker_threads()
        s = self.spec
        w = logical_worker(0, s.num_workers)
        start, stop, n_batches = self.slices[w]
        bad = BadSampleLog(s.on_error, s.max_logged_errors, f"rank {s.dp_rank} val worker {w}")
        transform = EvalTransform(s.img_size, s.in_chans, s.eval_crop_pct, s.interpolation)
        reader = PieceReader(iter(pieces_for_range(list(s.shards), start, stop - start)), bad)
        left = stop - start
        pad = np.zeros((s.img_size, s.img_size) if s.in_chans == 1 else (s.img_size, s.img_size, 3), np.uint8)
        for _ in range(n_batches):
            images, labels, valid = [], [], []
            while len(images) < s.batch_size:
                item = reader.next_item() if left > 0 else None
                if item is None:
                    images.append(pad), labels.append(0), valid.append(False)
                    continue
                left -= 1
                try:
                    # Full decode (no draft): the same pixels as `distvit predict` on the decoded image.
                    img = decode_crop(item, s.in_chans)[0]
                    label = read_label(item, s)
                    images.append(transform(img)), labels.append(label), valid.append(True)
                except BadSample as exc:
                    bad.report(item.get("__url__", "?"), item.get("__key__"), exc.reason)
                    images.append(pad), labels.append(0), valid.append(False)
            yield to_uint8_batch(images), torch.tensor(labels, dtype=torch.int64), torch.tensor(valid), bad.count
