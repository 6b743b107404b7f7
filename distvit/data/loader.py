"""The loaders the trainer uses: `build_train_loader` and `build_val_loader`.

    loader = build_train_loader(cfg.data, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size, seed=cfg.run.seed)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)            # keeps the position when `epoch` is the loaded state's epoch
                                           # (a state taken after an epoch's last batch then yields nothing)
        for images, labels in loader:      # exactly loader.steps_per_epoch batches on every rank, float32
                                           # normalised on `device` (workers send uint8: distvit.data.device)
            ...
            state = loader.state_dict()    # small JSON-able dict; load_state_dict(state) resumes bitwise

Both wrap a standard torch DataLoader over an IterableDataset (workers, pinned memory, timeout are
torch's). A new DataLoader is made per epoch (and per resume), since its dataset carries the epoch
and the cursors; workers therefore start afresh each epoch.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from distvit.data import remap
from distvit.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from distvit.data.device import DeviceNormalize
from distvit.data.errors import DataError, log
from distvit.data.pipeline import StreamSpec, TrainStream, ValStream
from distvit.data.shards import list_shards, steps_per_epoch, val_ranges

STATE_VERSION = 1


def resolve_stats(cfg: DataConfig, manifest: dict | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization: the config's, else the manifest's, else ImageNet's; fitted to data.in_chans."""
    mean = cfg.mean or (manifest or {}).get("mean") or list(IMAGENET_MEAN)
    std = cfg.std or (manifest or {}).get("std") or list(IMAGENET_STD)

    def fit(v):
        if len(v) == cfg.in_chans:
            return tuple(float(x) for x in v)
        if cfg.in_chans == 1:  # RGB statistics for grayscale decoding: their average
            return (sum(v) / len(v),)
        return tuple(float(v[0]) for _ in range(cfg.in_chans))  # grayscale statistics for RGB: repeat

    return fit(mean), fit(std)


def label_bound(manifest: dict | None, num_classes: int | None) -> tuple[int | None, str]:
    """Labels must lie in [0, bound): the manifest's class count and the model's (passed in), the smaller."""
    known = [(n, what) for n, what in (((manifest or {}).get("num_classes"), "the manifest's classes"),
                                       (num_classes, f"the model's {num_classes} classes (model.num_classes)"))
             if n]
    if not known:
        return None, "the classes"
    return min(known, key=lambda x: x[0])


def stats_line(cfg: DataConfig, manifest: dict | None, mean, std) -> str | None:
    """One line saying which normalisation training uses when there is no manifest to take it from."""
    if manifest is not None and manifest.get("mean") and manifest.get("std"):
        return None
    fmt = lambda v: "[" + ", ".join(f"{x:.3f}" for x in v) + "]"  # noqa: E731
    origin = "data.mean/data.std" if cfg.mean and cfg.std else (
        "ImageNet's defaults, since there is no dataset.json with statistics and data.mean/data.std are null")
    return (f"data: normalising '{cfg.train}' with mean {fmt(mean)} std {fmt(std)} from {origin}; set data.mean/"
            f"data.std, or record the shards' own with `distvit data verify PATTERN --write-manifest DIR`")


def _spec(cfg: DataConfig, shards, manifest, *, seed, epoch, dp_rank, dp_size, steps, start_step=0, cursors=(),
          num_classes=None, todo=None):
    mean, std = resolve_stats(cfg, manifest)
    bound, classes_from = label_bound(manifest, num_classes)
    return StreamSpec(
        shards=tuple(shards), seed=seed, epoch=epoch, dp_rank=dp_rank, dp_size=dp_size,
        num_workers=max(1, cfg.num_workers), batch_size=cfg.batch_size, steps=steps,
        shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, shard_split=cfg.shard_split,
        img_size=cfg.img_size, in_chans=cfg.in_chans, mean=mean, std=std,
        crop_scale=tuple(cfg.train_crop_scale), crop_ratio=tuple(cfg.train_crop_ratio), hflip=cfg.hflip,
        eval_crop_pct=cfg.eval_crop_pct, interpolation=cfg.interpolation, on_error=cfg.on_error,
        max_logged_errors=cfg.max_logged_errors, num_classes=bound, classes_from=classes_from,
        repeated_aug=cfg.repeated_aug,
        augment=(cfg.auto_augment, cfg.color_jitter, cfg.three_augment, cfg.reprob, cfg.remode),
        start_step=start_step, cursors=tuple(cursors),
        todo=None if todo is None else tuple(tuple(r) for r in todo),
    )


def _data_loader(cfg: DataConfig, dataset) -> DataLoader:
    workers = cfg.num_workers
    pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
    kwargs = {}
    if workers > 0:
        kwargs = dict(prefetch_factor=cfg.prefetch_factor, timeout=cfg.worker_timeout_s,
                      multiprocessing_context=cfg.mp_context)
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin, **kwargs)


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")


class TrainLoader:
    """Shuffled, augmented training batches; the same number of steps on every rank; exact resume."""

    def __init__(self, cfg: DataConfig, *, dp_rank: int, dp_size: int, seed: int, num_classes: int | None = None,
                 device=None):
        _check_rank(dp_rank, dp_size)
        self.device = torch.device(device or "cpu")  # where batches are normalised (and erased)
        from distvit.config.checks import repeated_aug_error  # the rule's one text; resolve() refuses it before start-up

        problem = repeated_aug_error(cfg.repeated_aug, dp_size)
        if problem:
            raise DataError(problem)
        self.cfg, self.dp_rank, self.dp_size, self.seed = cfg, dp_rank, dp_size, seed
        self.num_classes = num_classes  # the model's: labels outside it are bad samples, not an IndexError
        self.shards, self.manifest = list_shards(cfg.train, cfg.manifest, cfg.on_error, allow_pipe=cfg.allow_pipe,
                                                 what="data.train")
        self.normalize = DeviceNormalize(*resolve_stats(cfg, self.manifest), erase_mode=cfg.remode)
        line = stats_line(cfg, self.manifest, *resolve_stats(cfg, self.manifest))
        if line and dp_rank == 0:
            log.warning(line)
        self.num_samples = sum(s.samples for s in self.shards)
        self.steps_per_epoch = steps_per_epoch(self.num_samples, dp_size, cfg.batch_size, cfg.drop_last,
                                               f"training data '{cfg.train}'")
        self.num_workers = max(1, cfg.num_workers)
        self.epoch = 0
        self._step = 0  # batches of self.epoch consumed
        self._cursors: list[dict | None] = [None] * self.num_workers
        self._bad_before_epoch = 0
        self._loaded_at_epoch_end = False
        self._todo = None  # the rest of self.epoch after a reshape (data/remap.py); None: the whole epoch

    def epoch_steps(self) -> int:
        """Batches of the current epoch: steps_per_epoch, or the reshaped remainder's count."""
        if self._todo is None:
            return self.steps_per_epoch
        return remap.remainder_steps(self._todo, self.dp_size, self.cfg.batch_size, self.cfg.drop_last)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch; a no-op when already positioned in `epoch` (e.g. after resume)."""
        if epoch != self.epoch:
            self._finish_epoch()
            self.epoch = epoch
            self._loaded_at_epoch_end = False

    def _finish_epoch(self) -> None:
        self._bad_before_epoch += self._bad_this_epoch()
        self._step = 0
        self._cursors = [None] * self.num_workers
        self._todo = None

    def _bad_this_epoch(self) -> int:
        return sum(c["bad"] for c in self._cursors if c)

    def __iter__(self):
        if self._loaded_at_epoch_end:
            # The checkpoint was taken after the epoch's last batch: this epoch has nothing left
            # (the trainer's loop then moves on with set_epoch(epoch + 1)).
            self._loaded_at_epoch_end = False
            return
        if self._step >= self.epoch_steps():  # iterating a finished epoch again: same order, from the start
            self._finish_epoch()
        steps = self.epoch_steps()
        spec = _spec(self.cfg, self.shards, self.manifest, seed=self.seed, epoch=self.epoch,
                     dp_rank=self.dp_rank, dp_size=self.dp_size, steps=steps,
                     start_step=self._step, cursors=self._cursors, num_classes=self.num_classes, todo=self._todo)
        loader = _data_loader(self.cfg, TrainStream(spec))
        W = self.num_workers
        it = iter(loader)
        try:
            while self._step < steps:
                try:
                    images, labels, erase, cursor = next(it)
                except StopIteration:
                    raise RuntimeError(
                        f"data loader of rank {self.dp_rank} ended after {self._step} of {steps} "
                        f"batches in epoch {self.epoch}; this is a bug in distvit.data, please report it"
                    ) from None
                expected = (self._step % W, self._step // W + 1)
                if (cursor["worker"], cursor["batches"]) != expected:
                    raise RuntimeError(f"batch {self._step} came from worker {cursor['worker']} batch "
                                       f"{cursor['batches']}, expected {expected}; DataLoader order changed")
                self._cursors[cursor["worker"]] = cursor
                self._step += 1
                yield self.normalize(images, self.device, erase), labels
        finally:
            del it  # shuts the workers down even when the caller stops early

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "step": self._step, "seed": self.seed,
            "dp_rank": self.dp_rank, "dp_size": self.dp_size, "num_workers": self.num_workers,
            "batch_size": self.cfg.batch_size, "steps_per_epoch": self.steps_per_epoch,
            "num_samples": self.num_samples, "num_shards": len(self.shards), "shard_split": self.cfg.shard_split,
            "shuffle": self.cfg.shuffle, "shuffle_buffer": self.cfg.shuffle_buffer,
            "repeated_aug": self.cfg.repeated_aug, "drop_last": self.cfg.drop_last,
            "epoch_steps": self.epoch_steps(), "todo": self._todo,
            "bad_before_epoch": self._bad_before_epoch,
            "workers": [dict(c) if c else None for c in self._cursors],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. Needs the same data, dp size, batch size, workers."""
        if state.get("kind") == remap.RESHAPED:
            return self._load_reshaped(state["ranks"])
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r}, this distvit reads {STATE_VERSION}")
        now = self.state_dict()
        keys = ("seed", "dp_rank", "dp_size", "num_workers", "batch_size", "num_samples", "num_shards",
                "shard_split", "shuffle", "shuffle_buffer")
        diff = [f"{k}: saved {state[k]!r}, now {now[k]!r}" for k in keys if state.get(k) != now[k]]
        if diff:
            raise DataError(
                "cannot resume the data loader exactly: " + "; ".join(diff) + ". Exact mid-epoch resume needs the "
                "same shards, dp size, data.batch_size, data.num_workers and shuffle settings (0 and 1 workers "
                "are the same); restore those, or drop the data state to restart the epoch"
            )
        self.epoch, self._step = int(state["epoch"]), int(state["step"])
        self._bad_before_epoch = int(state["bad_before_epoch"])
        self._cursors = [dict(c) if c else None for c in state["workers"]]
        self._todo = state.get("todo")
        self._loaded_at_epoch_end = self._step >= self.epoch_steps()

    def _load_reshaped(self, states: list[dict]) -> None:
        """Continue the epoch the old ranks (`states`, one per old dp rank) were in, on this world size:
        every sample none of them consumed, split over this loader's ranks x workers (data/remap.py)."""
        for s in states:
            if s.get("version") != STATE_VERSION:
                raise DataError(f"loader state version {s.get('version')!r}, this distvit reads {STATE_VERSION}")
        if states and (states[0]["seed"], states[0]["shuffle"], states[0]["shard_split"]) != (
                self.seed, self.cfg.shuffle, self.cfg.shard_split):
            raise DataError("cannot carry the data cursor over: run.seed, data.shuffle or data.shard_split differ "
                            "from the checkpoint's, so the epoch's sample order differs")
        todo = remap.remainder(states, self.shards)  # raises before anything changes
        self._finish_epoch()
        self.epoch, self._todo = int(states[0]["epoch"]), todo
        # The old ranks' bad-sample counts, once: on dp rank 0 (the trainer sums them over dp).
        bad = sum(int(s["bad_before_epoch"]) + sum(c["bad"] for c in s["workers"] if c) for s in states)
        self._bad_before_epoch = bad if self.dp_rank == 0 else 0
        self._loaded_at_epoch_end = self.epoch_steps() == 0

    def stats(self) -> dict:
        return {"bad_samples": self._bad_before_epoch + self._bad_this_epoch(), "epoch": self.epoch,
                "step_in_epoch": self._step, "steps_per_epoch": self.steps_per_epoch}


class ValLoader:
    """Every val sample exactly once over all ranks (valid=True), the same number of batches on every rank."""

    def __init__(self, cfg: DataConfig, *, dp_rank: int, dp_size: int, num_classes: int | None = None, device=None):
        _check_rank(dp_rank, dp_size)
        self.device = torch.device(device or "cpu")
        if cfg.val is None:
            raise DataError("data.val is not set; give the validation shard pattern, e.g. data.val=data/digits/val-*.tar")
        self.cfg, self.dp_rank, self.dp_size, self.num_classes = cfg, dp_rank, dp_size, num_classes
        self.shards, self.manifest = list_shards(cfg.val, cfg.manifest, cfg.on_error, allow_pipe=cfg.allow_pipe,
                                                 what="data.val")
        self.num_samples = sum(s.samples for s in self.shards)
        self.normalize = DeviceNormalize(*resolve_stats(cfg, self.manifest))
        self.num_workers = max(1, cfg.num_workers)
        self.num_batches, self._slices = val_ranges(self.num_samples, dp_size, dp_rank, cfg.batch_size, self.num_workers)
        self.bad_samples = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        spec = _spec(self.cfg, self.shards, self.manifest, seed=0, epoch=0, dp_rank=self.dp_rank,
                     dp_size=self.dp_size, steps=self.num_batches, num_classes=self.num_classes)
        bad = [0] * self.num_workers
        it = iter(_data_loader(self.cfg, ValStream(spec, self._slices)))
        try:
            for i in range(self.num_batches):
                try:
                    images, labels, valid, worker_bad = next(it)
                except StopIteration:
                    raise RuntimeError(f"val loader of rank {self.dp_rank} ended after {i} of {self.num_batches} "
                                       "batches; this is a bug in distvit.data, please report it") from None
                bad[i % self.num_workers] = int(worker_bad)
                self.bad_samples = sum(bad)
                yield self.normalize(images, self.device), labels, valid
        finally:
            del it


def build_train_loader(cfg: DataConfig, *, dp_rank: int, dp_size: int, seed: int,
                       num_classes: int | None = None, device=None, patch_size=None) -> TrainLoader:
    """`num_classes`: the model's class count; a label outside it is a bad sample (data.on_error).
    `device`: where the uint8 batches are copied (pinned, non-blocking on CUDA) and normalised; CPU if None.
    With data.packing: a packed_loader.PackedTrainLoader for a model with this `patch_size`."""
    if cfg.packing is not None:
        from distvit.data.packed_loader import PackedTrainLoader

        return PackedTrainLoader(cfg, dp_rank=dp_rank, dp_size=dp_size, seed=seed, patch_size=patch_size,
                                 num_classes=num_classes, device=device)
    return TrainLoader(cfg, dp_rank=dp_rank, dp_size=dp_size, seed=seed, num_classes=num_classes, device=device)


def build_val_loader(cfg: DataConfig, *, dp_rank: int, dp_size: int, num_classes: int | None = None,
                     device=None, patch_size=None) -> ValLoader:
    if cfg.packing is not None:
        from distvit.data.packed_loader import PackedValLoader

        return PackedValLoader(cfg, dp_rank=dp_rank, dp_size=dp_size, patch_size=patch_size,
                               num_classes=num_classes, device=device)
    return ValLoader(cfg, dp_rank=dp_rank, dp_size=dp_size, num_classes=num_classes, device=device)
