"""The loaders of native-resolution training (`data.packing` set): PackedBatch micro-batches, exact resume.

    loader = build_train_loader(cfg.data, dp_rank=r, dp_size=dp, seed=s, patch_size=16)  # a PackedTrainLoader
    for packed, labels in loader:     # packed: distvit.data.packing.PackedBatch, patches normalised float32
        logits = model(packed)        # == model.forward_packed(packed); labels in the packed images' order

The same interface as loader.TrainLoader / ValLoader (set_epoch, state_dict / load_state_dict, stats,
steps_per_epoch; val yields (packed, labels, valid)). The plan (which images, which batch, which rank)
is distvit.data.pack_plan's; workers only read, decode, resize and pack the batches the plan gives
them: DataLoader worker k makes the rank's batches start + k, start + k + W, ... (torch collects
them round robin), so the batch order, and hence resume, does not depend on the worker count.

Each yielded PackedBatch also carries `step_grids`: the patch grids of the images every dp rank
sees at this step (from the plan), so the trainer counts img/s and FLOPs of the real tokens of the
whole step without a collective.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distvit.data.config import DataConfig
from distvit.data.errors import BadSample, BadSampleLog, DataError, log
from distvit.data.loader import _check_rank, _data_loader, label_bound, resolve_stats, stats_line
from distvit.data.manifest import local_path
from distvit.data.pack_plan import EpochPlan, Planned, build_index, epoch_plan
from distvit.data.packing import pack
from distvit.data.shards import list_shards
from distvit.data.transforms import RESAMPLE, decode_crop, decode_label

STATE_VERSION = 1
STATE_KIND = "packed"


def _patch(patch_size) -> int:
    p = patch_size if isinstance(patch_size, int) else tuple(patch_size)
    if isinstance(p, tuple):
        if p[0] != p[1]:
            raise DataError(f"data.packing needs square patches, the model's are {p[0]}x{p[1]}")
        p = p[0]
    return int(p)


class PackedNormalize:
    """uint8 patches (S, L, C*p*p) -> float32 (x / 255 - mean) / std on `device` (padding slots too; unused)."""

    def __init__(self, mean, std, patch: int):
        n = patch * patch
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).repeat_interleave(n)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).repeat_interleave(n)

    def __call__(self, packed, device: torch.device):
        out = packed.to(device, non_blocking=device.type == "cuda")
        out.patches = out.patches.float().mul_(self.scale.to(device)).sub_(self.shift.to(device))
        return out


class _Reader:
    """Reads planned samples from their tar offsets, decodes, resizes, flips; one per worker."""

    def __init__(self, shards, index, cfg: DataConfig, num_classes, classes_from, what: str):
        self.shards, self.index, self.cfg = shards, index, cfg
        self.num_classes, self.classes_from = num_classes, classes_from
        self.bad = BadSampleLog(cfg.on_error, cfg.max_logged_errors, what)
        self._files: dict[int, object] = {}

    def _item(self, s) -> dict:
        f = self._files.get(s.shard)
        if f is None:
            f = self._files[s.shard] = open(local_path(self.shards[s.shard].url), "rb")
        item = {"__key__": s.key, "__url__": self.shards[s.shard].url}
        for ext, offset, size in s.members:
            f.seek(offset)
            item[ext] = f.read(size)
        return item

    def sample(self, p: Planned) -> tuple[torch.Tensor, int] | None:
        s = self.index[p.sample]
        try:
            item = self._item(s)
        except OSError as exc:
            self.bad.report(self.shards[s.shard].url, s.key, f"cannot read the sample ({exc})")
            return None
        try:
            img = decode_crop(item, self.cfg.in_chans)[0]
            label = decode_label(item, None)
            if self.num_classes is not None and label >= self.num_classes:
                raise BadSample(f"label {label} is out of range [0, {self.num_classes}) of {self.classes_from}")
        except BadSample as exc:
            self.bad.report(item["__url__"], s.key, exc.reason)
            return None
        if img.size != (p.width, p.height):
            img = img.resize((p.width, p.height), RESAMPLE[self.cfg.interpolation])
        arr = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(arr.copy()).reshape(p.height, p.width, -1).permute(2, 0, 1).contiguous()
        if p.flip:
            t = t.flip(-1)
        return t, label

    def close(self):
        for f in self._files.values():
            f.close()


class _PackedStream(IterableDataset):
    """Worker k of W yields the rank's batches start + k, start + k + W, ... as (packed uint8, labels, info)."""

    def __init__(self, batches, start, shards, index, cfg, patch, num_classes, classes_from, what):
        super().__init__()
        self.batches, self.start = batches, start
        self.args = (shards, index, cfg, num_classes, classes_from, what)
        self.patch, self.max_tokens = patch, cfg.packing.max_tokens

    def __iter__(self):
        info = get_worker_info()
        k, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        reader = _Reader(*self.args)
        try:
            for b in range(self.start + k, len(self.batches), W):
                images, labels = [], []
                for p in self.batches[b]:
                    got = reader.sample(p)
                    if got is not None:
                        images.append(got[0]), labels.append(got[1])
                if not images:
                    raise DataError(f"{self.args[-1]}: every image of packed batch {b} failed to decode; check the "
                                    "shards with `distvit data verify`")
                packed = pack(images, self.patch, self.max_tokens)
                yield packed, torch.tensor(labels, dtype=torch.int64), {"batch": b, "bad": reader.bad.count}
        finally:
            reader.close()


class _PackedBase:
    def _setup(self, cfg: DataConfig, pattern: str, what: str, dp_rank: int, dp_size: int, patch_size,
               num_classes, device):
        _check_rank(dp_rank, dp_size)
        if cfg.packing is None:
            raise DataError("the packed loader needs data.packing")
        if patch_size is None:
            raise DataError("data.packing needs the model's patch size (a ViT-family model with patch_embed)")
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.patch = _patch(patch_size)
        self.device = torch.device(device or "cpu")
        self.what = f"{what} '{pattern}'"
        self.shards, self.manifest = list_shards(pattern, cfg.manifest, cfg.on_error, allow_pipe=cfg.allow_pipe,
                                                 what=what)
        self.index = build_index(self.shards, self.what)
        self.num_samples = len(self.index)
        self.num_classes, self.classes_from = label_bound(self.manifest, num_classes)
        stats = resolve_stats(cfg, self.manifest)
        self.normalize = PackedNormalize(*stats, self.patch)
        return stats

    def _plan(self, seed: int, epoch: int, shuffle: bool, train: bool) -> EpochPlan:
        return epoch_plan(self.index, self.shards, self.cfg.packing, patch=self.patch, rows=self.cfg.batch_size,
                          seed=seed, epoch=epoch, shuffle=shuffle, hflip=self.cfg.hflip if train else 0.0,
                          dp_size=self.dp_size, randomize=train, what=self.what)

    def _stream(self, batches, start: int, label: str):
        ds = _PackedStream(batches, start, self.shards, self.index, self.cfg, self.patch, self.num_classes,
                           self.classes_from, label)
        return iter(_data_loader(self.cfg, ds))


class PackedTrainLoader(_PackedBase):
    """Packed training batches: every sample once per epoch over ranks x workers, equal steps, exact resume."""

    def __init__(self, cfg: DataConfig, *, dp_rank: int, dp_size: int, seed: int, patch_size, num_classes=None,
                 device=None):
        stats = self._setup(cfg, cfg.train, "data.train", dp_rank, dp_size, patch_size, num_classes, device)
        self.seed = seed
        line = stats_line(cfg, self.manifest, *stats)
        if line and dp_rank == 0:
            log.warning(line)
        self.epoch, self._step = 0, 0
        self._bad_before_epoch, self._bad_this_epoch, self._bad_plan = 0, 0, 0
        self._loaded_at_epoch_end = False
        self._plans: dict[int, EpochPlan] = {}
        self.steps_per_epoch = self.steps(0)  # nominal: later epochs may differ by a few steps (pack_plan.py)

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {epoch: self._plan(self.seed, epoch, self.cfg.shuffle, train=True)}
            p = self._plans[epoch]
            if self.dp_rank == 0:
                log.info("data.packing epoch %d: %d samples in %d packed batches of %d x %d patches, fill %.3f",
                         epoch, sum(map(len, p.batches)), len(p.batches), self.cfg.batch_size,
                         self.cfg.packing.max_tokens, p.fill)
        return self._plans[epoch]

    def steps(self, epoch: int) -> int:
        """Batches of `epoch` on every rank."""
        return len(self.plan(epoch).batches) // self.dp_size

    def __len__(self) -> int:
        return self.steps(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._finish_epoch()
            self.epoch = epoch
            self._loaded_at_epoch_end = False

    def _finish_epoch(self) -> None:
        self._bad_before_epoch += self._bad_this_epoch + self._bad_plan
        self._bad_this_epoch, self._bad_plan, self._step = 0, 0, 0

    def __iter__(self):
        if self._loaded_at_epoch_end:
            self._loaded_at_epoch_end = False
            return
        plan = self.plan(self.epoch)
        steps = self.steps(self.epoch)
        if self._step >= steps:  # iterating a finished epoch again: same order, from the start
            self._finish_epoch()
        self._bad_plan = plan.bad if self.dp_rank == 0 else 0  # counted once over the ranks
        batches = plan.rank_batches(self.dp_rank, self.dp_size)
        bad_at_start, start = self._bad_this_epoch, self._step
        it = self._stream(batches, start, f"rank {self.dp_rank}")
        W = max(1, self.cfg.num_workers)
        worker_bad = [0] * W
        try:
            while self._step < steps:
                try:
                    packed, labels, info = next(it)
                except StopIteration:
                    raise RuntimeError(f"packed loader of rank {self.dp_rank} ended after {self._step} of {steps} "
                                       f"batches in epoch {self.epoch}; this is a bug in distvit.data") from None
                if info["batch"] != self._step:
                    raise RuntimeError(f"packed batch {info['batch']} arrived where {self._step} was expected; "
                                       "DataLoader order changed")
                worker_bad[(info["batch"] - start) % W] = info["bad"]
                self._bad_this_epoch = bad_at_start + sum(worker_bad)
                packed.step_grids = torch.from_numpy(plan.step_grids(self._step, self.dp_size, self.patch))
                self._step += 1
                yield self.normalize(packed, self.device), labels
        finally:
            del it

    def state_dict(self) -> dict:
        p = self.cfg.packing
        return {
            "version": STATE_VERSION, "kind": STATE_KIND, "epoch": self.epoch, "step": self._step, "seed": self.seed,
            "dp_rank": self.dp_rank, "dp_size": self.dp_size, "batch_size": self.cfg.batch_size,
            "num_samples": self.num_samples, "num_shards": len(self.shards), "shuffle": self.cfg.shuffle,
            "packing": p.model_dump(mode="json"), "patch": self.patch, "hflip": self.cfg.hflip,
            "steps_per_epoch": self.steps_per_epoch, "bad_before_epoch": self._bad_before_epoch,
            "bad_this_epoch": self._bad_this_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. Needs the same data, dp size, packing and batch size
        (the worker count may differ: the plan does not depend on it)."""
        if state.get("kind") != STATE_KIND or state.get("version") != STATE_VERSION:
            raise DataError("cannot resume the packed loader from a state of the square-crop loader (or another "
                            "version); resume with the data.packing settings of the checkpoint, or drop the data state")
        now = self.state_dict()
        keys = ("seed", "dp_rank", "dp_size", "batch_size", "num_samples", "num_shards", "shuffle", "packing",
                "patch", "hflip")
        diff = [f"{k}: saved {state.get(k)!r}, now {now[k]!r}" for k in keys if state.get(k) != now[k]]
        if diff:
            raise DataError("cannot resume the packed loader exactly: " + "; ".join(diff) + ". Exact mid-epoch resume "
                            "needs the same shards, dp size, data.batch_size, data.packing and shuffle settings; "
                            "restore those, or drop the data state to restart the epoch")
        self.epoch, self._step = int(state["epoch"]), int(state["step"])
        self._bad_before_epoch, self._bad_this_epoch = int(state["bad_before_epoch"]), int(state["bad_this_epoch"])
        self._loaded_at_epoch_end = self._step >= self.steps(self.epoch)

    def stats(self) -> dict:
        return {"bad_samples": self._bad_before_epoch + self._bad_this_epoch + self._bad_plan, "epoch": self.epoch,
                "step_in_epoch": self._step, "steps_per_epoch": self.steps(self.epoch),
                "pack_fill": self.plan(self.epoch).fill}


class PackedValLoader(_PackedBase):
    """Every val image exactly once over all ranks at its native aspect ratio; the same batch count per rank."""

    def __init__(self, cfg: DataConfig, *, dp_rank: int, dp_size: int, patch_size, num_classes=None, device=None):
        if cfg.val is None:
            raise DataError("data.val is not set; give the validation shard pattern, e.g. data.val=data/digits/val-*.tar")
        self._setup(cfg, cfg.val, "data.val", dp_rank, dp_size, patch_size, num_classes, device)
        self._full_plan = self._plan(0, 0, shuffle=False, train=False)
        self.num_batches = len(self._full_plan.batches) // dp_size
        self.bad_samples = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        batches = self._full_plan.rank_batches(self.dp_rank, self.dp_size)
        it = self._stream(batches, 0, f"rank {self.dp_rank} val")
        self.bad_samples = self._full_plan.bad if self.dp_rank == 0 else 0
        base = self.bad_samples
        worker_bad = [0] * max(1, self.cfg.num_workers)
        try:
            for i in range(self.num_batches):
                try:
                    packed, labels, info = next(it)
                except StopIteration:
                    raise RuntimeError(f"packed val loader of rank {self.dp_rank} ended after {i} of "
                                       f"{self.num_batches} batches; this is a bug in distvit.data") from None
                worker_bad[i % len(worker_bad)] = info["bad"]
                self.bad_samples = base + sum(worker_bad)
                yield self.normalize(packed, self.device), labels, torch.ones(len(labels), dtype=torch.bool)
        finally:
            del it
