"""Shards from image files on disk (imagefolder, csv) in bounded memory, in one or several processes.

The sources hand over a list of (path relative to a root, class index) per split; nothing else about
the dataset is held. Shard boundaries are planned up front from file sizes (`os.stat`), with
webdataset's ShardWriter rule (a new shard once `samples_per_shard` samples or `shard_bytes` bytes of
member data are in the open one), so every shard is an independent job: a worker process reads its
files one at a time, writes the tar with a fixed mtime, hashes it in chunks and returns a few numbers
(the manifest entry, the image sizes and modes it saw, pixel sums for the mean/std subset). The
output is byte-identical whatever the worker count, and the same as writing sequentially.

Memory: the file list (about 100-200 bytes per image) plus, per process, one image and one chunk of a
shard; never the images of a split (tests/test_data_write_memory.py measures it).
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import random
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from distvit.data.errors import DataError

GRAY_MODES = ("L", "I;16", "1")


class ShardJob(NamedTuple):
    out_dir: str
    split: str
    index: int  # shard number: {split}-{index:06d}.tar
    first: int  # index in the split of the shard's first sample (the key is {split}_{first + i:08d})
    root: str
    items: list  # [(relative path, label)]
    stats: frozenset  # indices in the split whose pixels go into mean/std


def item_ext(rel: str) -> str:
    ext = os.path.splitext(rel)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _meta(rel: str) -> bytes:
    from distvit.data.write import json_bytes

    return json_bytes({"path": rel})


def plan_shards(items: list[tuple[str, int]], root: str, samples_per_shard: int, shard_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) per shard, as ShardWriter would cut them (count, or member bytes, reached before a write)."""
    bounds, start, count, size = [], 0, 0, 0
    for i, (rel, label) in enumerate(items):
        if count and (count >= samples_per_shard or size >= shard_bytes):
            bounds.append((start, i))
            start, count, size = i, 0, 0
        try:
            nbytes = os.stat(os.path.join(root, rel)).st_size
        except OSError as exc:
            raise DataError(f"image '{os.path.join(root, rel)}' cannot be read ({exc.strerror}); "
                            f"restore it or remove it from the source") from None
        size += nbytes + len(str(label)) + len(_meta(rel))
        count += 1
    if count:
        bounds.append((start, len(items)))
    return bounds


def write_shard(job: ShardJob) -> dict:
    """One shard from its files; returns its manifest entry and what the manifest needs from its images."""
    from webdataset import TarWriter

    from distvit.data.write import FIXED_MTIME

    name = f"{job.split}-{job.index:06d}.tar"
    path = os.path.join(job.out_dir, name)
    sizes, gray = set(), True
    sums = {1: np.zeros(1), 3: np.zeros(3)}
    squares = {1: np.zeros(1), 3: np.zeros(3)}
    pixels = 0
    with TarWriter(path, encoder=False, mtime=FIXED_MTIME) as writer:
        for i, (rel, label) in enumerate(job.items):
            file = os.path.join(job.root, rel)
            try:
                with open(file, "rb") as f:
                    data = f.read()
                with Image.open(io.BytesIO(data)) as im:
                    sizes.add(im.size)
                    gray = gray and im.mode in GRAY_MODES
                    if job.first + i in job.stats:
                        for ch, mode in ((1, "L"), (3, "RGB")):
                            a = np.asarray(im.convert(mode)).reshape(-1, ch).astype(np.float64) / 255.0
                            sums[ch] += a.sum(0)
                            squares[ch] += (a * a).sum(0)
                        pixels += im.size[0] * im.size[1]
            except (OSError, SyntaxError, ValueError) as exc:  # PIL: UnidentifiedImageError is an OSError
                raise DataError(f"image '{file}' cannot be read as an image ({type(exc).__name__}: {exc}); "
                                f"fix or remove it, then write again") from None
            writer.write({"__key__": f"{job.split}_{job.first + i:08d}", item_ext(rel): data,
                          "cls": str(label).encode(), "json": _meta(rel)})
    digest, nbytes = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            nbytes += len(chunk)
    return {"shard": {"name": name, "samples": len(job.items), "bytes": nbytes, "sha256": digest.hexdigest()},
            "sizes": sizes, "gray": gray, "sums": sums, "squares": squares, "pixels": pixels}


def _stats(results: list[dict], channels: int) -> tuple[list[float], list[float]]:
    s = sum((r["sums"][channels] for r in results), np.zeros(channels))
    s2 = sum((r["squares"][channels] for r in results), np.zeros(channels))
    n = sum(r["pixels"] for r in results)
    if n == 0:
        return [0.5] * channels, [0.5] * channels
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 1e-12))
    return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]


def _run(jobs: list[ShardJob], workers: int, progress: Callable[[int], None] | None) -> list[dict]:
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(write_shard(job))
            if progress:
                progress(len(job.items))
        return results
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(min(workers, len(jobs))) as pool:
        for result in pool.imap(write_shard, jobs):  # in shard order; each result is a few numbers
            results.append(result)
            if progress:
                progress(result["shard"]["samples"])
    return results


def write_file_dataset(out_dir: str | Path, root: str | Path, splits: dict[str, list[tuple[str, int]]], *, name: str,
                       classes: list[str], source: str, samples_per_shard: int, shard_bytes: int, overwrite: bool,
                       show_progress: bool, workers: int = 1, seed: int = 0, stats_samples: int = 2000) -> Path:
    """Shards `{split}-NNNNNN.tar` and dataset.json from files `root/<relative path>`; returns the manifest path."""
    from distvit.data.manifest import write_manifest
    from distvit.data.write import _bar, prepare_output

    if workers < 1:
        raise DataError(f"--workers (writer processes) must be >= 1, got {workers}")
    out, root = Path(out_dir), str(root)
    prepare_output(out, overwrite)
    order = list(range(len(splits.get("train", []))))
    random.Random(seed).shuffle(order)  # the same subset the sequential writer used
    stats_subset = frozenset(order[:stats_samples])
    manifest_splits, train_results = {}, []
    for split, items in splits.items():
        jobs = [ShardJob(str(out), split, k, lo, root, items[lo:hi], stats_subset if split == "train" else frozenset())
                for k, (lo, hi) in enumerate(plan_shards(items, root, samples_per_shard, shard_bytes))]
        bar = _bar(len(items), f"writing {split}", show_progress)
        results = _run(jobs, workers, bar.update if bar else None)
        if bar:
            bar.close()
        shards = [r["shard"] for r in results]
        manifest_splits[split] = {"pattern": f"{split}-{{000000..{len(shards) - 1:06d}}}.tar" if shards else None,
                                  "samples": len(items), "shards": shards}
        if split == "train":
            train_results = results
    sizes = set().union(*(r["sizes"] for r in train_results)) if train_results else set()
    channels = 1 if all(r["gray"] for r in train_results) else 3
    mean, std = _stats(train_results, channels)
    size = list(next(iter(sizes))[::-1]) if len(sizes) == 1 else None  # [H, W]
    return write_manifest(out, {
        "name": name, "source": source, "classes": classes, "num_classes": len(classes),
        "image_size": size, "channels": channels, "mean": mean, "std": std, "splits": manifest_splits,
    })
