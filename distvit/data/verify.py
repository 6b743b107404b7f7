"""`distvit data verify`: read shards as training does and report what is in them and what is wrong.

Every sample goes through the loader's own reader and decoders (webdataset tar iteration, PIL
decode, label checks), one shard after another, with a progress bar. The report has the sample and
class counts, per-shard counts and sha256 against the manifest, the split over `world` ranks and
`workers` workers for epoch 0 (as the train loader would do it), each bad sample (shard, key,
reason) and the decode throughput. `--write-manifest DIR` turns the result into a dataset.json for
shards made by other tools.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from distvit.data.errors import BadSample, BadSampleLog, DataError
from distvit.data.manifest import (is_local, local_path, missing_from_manifest, read_manifest, shard_counts,
                                   write_manifest)
from distvit.data.reader import PieceReader
from distvit.data.shards import Piece, Shard, expand_pattern, steps_per_epoch, train_plan, worker_batches
from distvit.data.transforms import decode_image, decode_label
from distvit.data.write import image_stats

STATS_SAMPLES = 2000


@dataclass
class ShardReport:
    url: str
    samples: int = 0  # readable samples (good or bad) found in the tar
    expected: int | None = None  # from the manifest
    sha256: str | None = None
    sha256_expected: str | None = None


@dataclass
class VerifyReport:
    pattern: str
    manifest: str | None
    shards: list[ShardReport] = field(default_factory=list)
    good: int = 0
    classes: Counter = field(default_factory=Counter)
    bad: list[tuple[str, str | None, str]] = field(default_factory=list)  # (shard, key, reason)
    seconds: float = 0.0
    sizes: Counter = field(default_factory=Counter)
    grayscale: bool = True
    mean: list[float] | None = None
    std: list[float] | None = None
    split: dict | None = None
    layout: list[str] = field(default_factory=list)  # shard-level problems (non-adjacent files, missing shards)

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def problems(self) -> list[str]:
        out = list(self.layout)
        if self.split and "error" in self.split:
            out.append(f"split: {self.split['error']}")
        out += [f"{b[0]}{'' if b[1] is None else ' key ' + repr(b[1])}: {b[2]}" for b in self.bad]
        for s in self.shards:
            if s.expected is not None and s.expected != s.samples:
                out.append(f"{s.url}: {s.samples} samples, manifest says {s.expected}")
            if s.sha256_expected and s.sha256 and s.sha256 != s.sha256_expected:
                out.append(f"{s.url}: sha256 {s.sha256[:12]}..., manifest says {s.sha256_expected[:12]}...")
        return out

    def to_dict(self) -> dict:
        return {
            "pattern": self.pattern, "manifest": self.manifest, "shards": len(self.shards), "samples": self.total,
            "good": self.good, "bad": len(self.bad), "classes": dict(sorted(self.classes.items())),
            "images_per_s": round(self.total / self.seconds, 1) if self.seconds else None,
            "split": self.split, "problems": self.problems,
        }


class _Collect(BadSampleLog):
    """Collects every bad sample instead of logging it."""

    def __init__(self, report: VerifyReport):
        super().__init__("skip", 0, "verify")
        self.report_to = report

    def report(self, shard: str, key: str | None, reason: str, n: int = 1) -> None:
        self.report_to.bad.append((shard, key, reason))


def _sha256(url: str) -> str | None:
    if not is_local(url):
        return None
    h = hashlib.sha256()
    with open(local_path(url), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(pattern: str, *, world: int = 1, workers: int = 1, batch_size: int = 64, manifest_path: str | None = None,
           in_chans: int = 3, progress: bool = True, allow_pipe: bool = False) -> VerifyReport:
    urls = expand_pattern(pattern, allow_pipe=allow_pipe, what="the pattern", flag="--allow-pipe")
    manifest = read_manifest(manifest_path or pattern)
    counts = shard_counts(manifest)
    sums = {s["name"]: s.get("sha256") for sp in (manifest or {}).get("splits", {}).values() for s in sp.get("shards", [])}
    report = VerifyReport(pattern, manifest_path or (None if manifest is None else "dataset.json beside the shards"))
    num_classes = (manifest or {}).get("num_classes")
    bad = _Collect(report)
    rng = np.random.default_rng(0)
    stats_arrays: list[np.ndarray] = []
    known_total = sum(counts.get(os.path.basename(u), 0) for u in urls) or None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=known_total, desc="verify", unit="img")
    start = time.perf_counter()
    for url in urls:
        name = os.path.basename(url)
        shard = ShardReport(url, expected=counts.get(name), sha256=_sha256(url), sha256_expected=sums.get(name))
        reader = PieceReader(iter([Piece(url, 0, -1)]), bad)  # take=-1: the whole tar
        tracker = KeyTracker()
        while (item := reader.next_item()) is not None:
            shard.samples += 1
            key = item.get("__key__")
            tracker.see(key)
            try:
                img = decode_image(item, in_chans)
                label = decode_label(item, num_classes)
            except BadSample as exc:
                bad.report(url, key, exc.reason)
            else:
                report.good += 1
                report.classes[label] += 1
                report.sizes[img.size] += 1
                if len(stats_arrays) < STATS_SAMPLES or rng.random() < STATS_SAMPLES / report.good:
                    arr = np.asarray(img)
                    report.grayscale = report.grayscale and bool(arr.ndim == 2 or (np.ptp(arr, axis=-1) == 0).all())
                    if len(stats_arrays) < STATS_SAMPLES:
                        stats_arrays.append(arr)
                    else:
                        stats_arrays[int(rng.integers(STATS_SAMPLES))] = arr
            if bar is not None:
                bar.update(1)
        report.shards.append(shard)
        if tracker.split_keys:
            report.layout.append(not_adjacent_message(url, tracker))
    report.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    report.layout += missing_from_manifest(pattern, urls, manifest)
    channels = 1 if report.grayscale else in_chans
    if stats_arrays:
        arrays = [a if channels == in_chans else (a if a.ndim == 2 else a[..., 0]) for a in stats_arrays]
        report.mean, report.std = image_stats(arrays, channels)
    report.split = split_summary([Shard(s.url, s.samples) for s in report.shards], world, workers, batch_size)
    return report


class KeyTracker:
    """Notices a key that comes back after other keys: the files of one sample are not adjacent in the tar.

    webdataset groups *consecutive* files with the same key into a sample, so `tar cf x.tar *.png *.cls`
    (all images, then all labels) reads as one sample without a label per image and one without an
    image per label."""

    def __init__(self):
        self.seen: set[str] = set()
        self.last: str | None = None
        self.split_keys = 0
        self.example: str | None = None

    def see(self, key: str | None) -> None:
        if key is None or key == self.last:
            return
        if key in self.seen:
            self.split_keys += 1
            self.example = self.example or key
        self.seen.add(key)
        self.last = key


def not_adjacent_message(url: str, tracker: KeyTracker) -> str:
    return (f"{url}: the files of {tracker.split_keys} sample(s) are not adjacent in the tar (e.g. key "
            f"'{tracker.example}' comes back after other keys), so each reads as two bad samples; webdataset needs "
            f"a sample's files next to each other: re-create it with `ls *.png *.cls | LC_ALL=C sort | tar -cf x.tar -T -` "
            f"or `tar --sort=name -cf x.tar -C DIR .`, or write the shards with `distvit data write`")


def split_summary(shards: list[Shard], world: int, workers: int, batch_size: int) -> dict | None:
    """Steps per epoch and samples per (rank, worker) in epoch 0, as the train loader plans them."""
    total = sum(s.samples for s in shards)
    if total == 0:
        return None
    if total < world * batch_size:
        return {"error": f"{total} samples cannot fill one global batch of {world} rank(s) x batch {batch_size} = "
                         f"{world * batch_size}, so training would stop at start; lower data.batch_size "
                         f"(--batch-size here), use fewer ranks, or set data.drop_last=false"}
    steps = steps_per_epoch(total, world, batch_size, True, "the shards")
    per_rank = []
    for rank in range(world):
        plans = train_plan(shards, seed=0, epoch=0, shuffle=True, split="samples", dp_rank=rank, dp_size=world,
                           num_workers=max(1, workers), batch_size=batch_size, steps=steps)
        per_rank.append([p.quota for p in plans])
    return {"world": world, "workers": max(1, workers), "batch_size": batch_size, "steps_per_epoch": steps,
            "samples_per_rank_worker": per_rank, "dropped_per_epoch": total - steps * world * batch_size,
            "batches_per_worker": worker_batches(steps, max(1, workers))}


def manifest_from_report(report: VerifyReport, split: str, existing: dict | None) -> dict:
    """A dataset.json body for verified shards (merged into an existing manifest's other splits)."""
    if not report.classes:
        raise DataError(f"no manifest written: none of the {report.total} samples of '{report.pattern}' has a usable "
                        f"image and label, so there are no classes to record; fix the shards (see the problems above)")
    labels = sorted(report.classes)
    num_classes = max(labels) + 1 if labels else 0
    base = dict(existing or {})
    base.pop("format", None)
    size = None
    if len(report.sizes) == 1:
        w, h = next(iter(report.sizes))
        size = [h, w]
    splits = dict(base.get("splits", {}))
    splits[split] = {"pattern": report.pattern, "samples": report.total,
                     "shards": [{"name": os.path.basename(s.url), "samples": s.samples, "sha256": s.sha256}
                                for s in report.shards]}
    classes = base.get("classes") or [str(i) for i in range(num_classes)]
    if len(classes) < num_classes:
        classes = classes + [str(i) for i in range(len(classes), num_classes)]
    out = {**base, "name": base.get("name", "shards"), "classes": classes, "num_classes": len(classes),
           "splits": splits, "source": base.get("source", "distvit data verify --write-manifest")}
    if split == "train" or "mean" not in out:
        out.update(image_size=size, channels=1 if report.grayscale else 3, mean=report.mean, std=report.std)
    return out


def write_manifest_for(report: VerifyReport, out_dir: str, split: str) -> str:
    existing = read_manifest(os.path.join(out_dir, "dataset.json"))
    return str(write_manifest(out_dir, manifest_from_report(report, split, existing)))
