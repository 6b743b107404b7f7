"""Shard listing and the per-epoch work plan: which rank and which worker read which samples.

webdataset splits work by whole shards (`split_by_node`, then `split_by_worker`), so when the shard
count does not divide ranks x workers, ranks get different sample counts and the shortest one ends
its epoch first while the others wait in a collective forever. Here every (rank, worker) gets a
fixed number of *batches*, computed from the per-shard sample counts (manifest, or tar headers):

    steps_per_epoch = N // (dp_size * batch)       (drop_last; ceil with drop_last=False)
    logical worker w of a rank makes the batches i with i % W == w (the order in which torch's
    DataLoader collects batches from its workers), so it needs B * ceil((steps - w) / W) samples.

`shard_split="samples"` hands each (rank, worker) a contiguous range of the epoch's shuffled sample
sequence (shard order from (seed, epoch), samples in tar order), so every sample is read once per
epoch whatever the shard count; a shard on a range boundary is read in part by two workers.
`shard_split="shards"` keeps webdataset's whole-shard round robin; a share with too many samples
stops early, one with too few wraps around its own shards. Either way a share that runs short
(bad samples skipped) continues past its end (`overflow`), so every worker fills its quota.
"""
from __future__ import annotations

import glob
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from distvit.data.errors import DataError, log
from distvit.data.manifest import is_local, local_path, missing_from_manifest, read_manifest, shard_counts

GLOB_CHARS = set("*?[")


class Shard(NamedTuple):
    url: str
    samples: int


class Piece(NamedTuple):
    """Read samples [skip, skip + take) of one shard (in tar order)."""

    url: str
    skip: int
    take: int


def check_pipe(urls: list[str], pattern: str, allow_pipe: bool, what: str, flag: str) -> None:
    """`pipe:` URLs run a shell command (webdataset's gopen): only with an explicit opt-in."""
    pipes = [u for u in urls if u.startswith("pipe:")]
    if pipes and not allow_pipe:
        raise DataError(f"{what} '{pattern}' holds a pipe: URL ('{pipes[0]}'), which runs a shell command; "
                        f"allow it with {flag} if you trust the command, or give the shard paths")


def expand_pattern(pattern: str, *, allow_pipe: bool = False, what: str = "shard pattern",
                   flag: str = "data.allow_pipe=true") -> list[str]:
    """Shard URLs of a pattern: `::`-joined parts, braces (webdataset's expand_urls), local globs."""
    from webdataset.shardlists import expand_urls

    try:
        urls = expand_urls(pattern)
    except AssertionError as exc:  # webdataset asserts on a ${VAR} without WDS_VAR in the environment
        raise DataError(f"shard pattern '{pattern}': {exc}; set the variable or write the path out") from None
    check_pipe(urls, pattern, allow_pipe, what, flag)
    out: list[str] = []
    for url in urls:
        if is_local(url) and GLOB_CHARS & set(url):
            out.extend(sorted(glob.glob(local_path(url))))
        else:
            out.append(url)
    if not out:
        raise DataError(f"shard pattern '{pattern}' matches no shard; check the path "
                        f"(write the demo data with `distvit data write digits --out data/digits`)")
    missing = [u for u in out if is_local(u) and not os.path.isfile(local_path(u))]
    if missing:
        raise DataError(f"shard pattern '{pattern}' names {len(missing)} shard(s) that do not exist, "
                        f"e.g. '{missing[0]}'; fix the pattern (brace range or glob) to match the files")
    return out


def count_tar_samples(url: str) -> int:
    """Samples in a local tar, from its headers only (consecutive members sharing a key are one sample)."""
    from webdataset.tariterators import base_plus_ext

    count, last, seen = 0, None, set()
    with tarfile.open(local_path(url), "r:*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            name = member.name
            if os.path.basename(name).startswith("__") and name.endswith("__"):
                continue
            key, _ = base_plus_ext(name)
            if key is not None and key != last:
                if key in seen:
                    raise SamplesApart(key)
                seen.add(key)
                count, last = count + 1, key
    return count


class SamplesApart(Exception):
    """A key comes back after other keys: the files of a sample are not adjacent (webdataset needs them so)."""

    def message(self, url: str) -> str:
        return (f"shard '{url}': the files of a sample are not adjacent (key '{self.args[0]}' comes back after other "
                f"keys, e.g. from `tar cf x.tar *.png *.cls`), so no sample would have both image and label; "
                f"re-create it with `ls *.png *.cls | LC_ALL=C sort | tar -cf x.tar -T -` or `distvit data write`")


def list_shards(pattern: str, manifest_path: str | None = None, on_error: str = "skip", *, allow_pipe: bool = False,
                what: str = "shard pattern") -> tuple[list[Shard], dict | None]:
    """Shards of a pattern with their sample counts, and the manifest (if any) they came from."""
    urls = expand_pattern(pattern, allow_pipe=allow_pipe, what=what)
    manifest = read_manifest(manifest_path or pattern)
    known = shard_counts(manifest)
    for line in missing_from_manifest(pattern, urls, manifest):  # a glob no longer matches a deleted shard
        if on_error == "raise":
            raise DataError(f"shard {line}")
        log.warning("shard %s; left out of the epoch", line)
    shards = []
    for url in urls:
        name = os.path.basename(urlparse_path(url))
        if name in known:
            shards.append(Shard(url, known[name]))
            continue
        if not is_local(url):
            raise DataError(
                f"no sample count for shard '{url}': it is not in a dataset.json manifest and is not a local "
                f"file whose headers can be read; set data.manifest to the dataset.json "
                f"(make one with `distvit data verify '{pattern}' --write-manifest DIR`)"
            )
        try:
            shards.append(Shard(url, count_tar_samples(url)))
        except SamplesApart as exc:
            if on_error == "raise":
                raise DataError(exc.message(url)) from None
            log.warning("%s; left out of the epoch", exc.message(url))
        except (tarfile.TarError, OSError, EOFError) as exc:
            if on_error == "raise":
                raise DataError(f"shard '{url}' is not a readable tar ({exc}); fix or remove it, "
                                f"or set data.on_error=skip to leave it out") from None
            log.warning("shard '%s' is not a readable tar (%s); left out of the epoch", url, exc)
    if sum(s.samples for s in shards) == 0:
        raise DataError(f"shard pattern '{pattern}' matches {len(urls)} shard(s) with no samples in them")
    return shards, manifest


def urlparse_path(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).path if not url.startswith("pipe:") else url.split()[-1]


def stable_rng(*parts: int) -> np.random.Generator:
    """A generator that depends only on the given integers (never on PYTHONHASHSEED or the process)."""
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def epoch_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    if not shuffle:
        return list(shards)
    perm = stable_rng(seed, epoch, 0x5EED).permutation(len(shards))
    return [shards[i] for i in perm]


def worker_batches(steps: int, num_workers: int) -> list[int]:
    """Batches made by each logical worker: batch i of the epoch comes from worker i % W."""
    return [max(0, (steps - w + num_workers - 1) // num_workers) for w in range(num_workers)]


def batches_done(step: int, worker: int, num_workers: int) -> int:
    """Batches logical `worker` had made when the rank had consumed `step` batches."""
    return max(0, (step - worker + num_workers - 1) // num_workers)


def pieces_for_range(order: list[Shard], start: int, length: int) -> list[Piece]:
    """Pieces covering positions [start, start + length) of the epoch's sample sequence, cyclically."""
    total = sum(s.samples for s in order)
    pieces: list[Piece] = []
    if length <= 0 or total == 0:
        return pieces
    bounds = np.cumsum([0] + [s.samples for s in order])
    pos, left = start % total, length
    while left > 0:
        i = int(np.searchsorted(bounds, pos, side="right")) - 1
        skip = pos - int(bounds[i])
        take = min(order[i].samples - skip, left)
        pieces.append(Piece(order[i].url, skip, take))
        left -= take
        pos = (pos + take) % total
    return pieces


def todo_length(todo) -> int:
    return sum(int(n) for _, n in todo or ())


def todo_slice(todo, start: int, length: int) -> list[tuple[int, int]]:
    """Runs of positions for todo-indices [start, start + length), cyclically (drop_last=false pads)."""
    total = todo_length(todo)
    out: list[tuple[int, int]] = []
    if total == 0 or length <= 0:
        return out
    bounds = np.cumsum([0] + [int(n) for _, n in todo])
    idx, left = start % total, length
    while left > 0:
        i = int(np.searchsorted(bounds, idx, side="right")) - 1
        off = idx - int(bounds[i])
        take = min(int(todo[i][1]) - off, left)
        out.append((int(todo[i][0]) + off, take))
        left -= take
        idx = (idx + take) % total
    return out


@dataclass(frozen=True)
class WorkerPlan:
    primary: list[Piece]  # this worker's share of the epoch
    quota: int  # samples it must deliver (batches x batch size)
    overflow_start: int  # where it continues in the epoch's sequence if the share runs short
    order: tuple[Shard, ...]
    own_shards: tuple[Shard, ...] | None  # shard_split="shards": overflow wraps over these

    def overflow(self) -> Iterator[Piece]:
        """Endless pieces after the share (the caller stops at its quota, or when nothing decodes)."""
        if self.own_shards and any(s.samples for s in self.own_shards):
            while True:
                for s in self.own_shards:
                    yield Piece(s.url, 0, s.samples)
        total = sum(s.samples for s in self.order)
        pos = self.overflow_start
        while True:
            for piece in pieces_for_range(list(self.order), pos, total):
                yield piece
            # a full cycle later we are back at `pos`


def train_plan(
    shards: list[Shard], *, seed: int, epoch: int, shuffle: bool, split: str,
    dp_rank: int, dp_size: int, num_workers: int, batch_size: int, steps: int, repeats: int = 1, todo=None,
) -> list[WorkerPlan]:
    """One plan per logical worker of `dp_rank` for `epoch`.

    repeats > 1 (data.repeated_aug, DeiT's RASampler; split="samples" only): the epoch reads the first
    D = dp_size * S / repeats samples of its sequence (S = steps x batch per rank), and rank r the S
    positions from r * S / repeats, cyclically within D, so every one of them is read by `repeats`
    consecutive, different ranks (exactly when repeats divides S); each rank still makes `steps` batches.

    todo ([start, length] runs of the sequence; the rest of an epoch resumed on another world size,
    data/remap.py): rank r reads the todo-indices [r * S, (r + 1) * S), its workers sub-ranges of it."""
    order = epoch_order(shards, seed, epoch, shuffle)
    if todo is not None:
        return _todo_plan(order, todo, dp_rank, batch_size, steps, num_workers)
    if repeats > 1:
        order = repeated_order(order, dp_size * steps * batch_size, repeats)
    quotas = [b * batch_size for b in worker_batches(steps, num_workers)]
    total = sum(s.samples for s in order)
    plans = []
    if split == "samples":
        start = dp_rank * steps * batch_size // repeats
        for w in range(num_workers):
            plans.append(WorkerPlan(pieces_for_range(order, start, quotas[w]), quotas[w],
                                    (start + quotas[w]) % total, tuple(order), None))
            start += quotas[w]
        return plans
    # "shards": webdataset's split_by_node then split_by_worker, then cut or wrap to the quota.
    rank_shards = order[dp_rank::dp_size]
    for w in range(num_workers):
        own = rank_shards[w::num_workers]
        primary, left = [], quotas[w]
        for s in own:
            if left <= 0:
                break
            primary.append(Piece(s.url, 0, min(s.samples, left)))
            left -= primary[-1].take
        # A share with no shard at all borrows from the epoch sequence, starting at a per-slot offset.
        offset = (dp_rank * num_workers + w) * total // max(1, dp_size * num_workers)
        plans.append(WorkerPlan(primary, quotas[w], offset, tuple(order), tuple(own) if own else None))
    return plans


def _todo_plan(order: list[Shard], todo, dp_rank: int, batch_size: int, steps: int, num_workers: int) -> list[WorkerPlan]:
    total = sum(s.samples for s in order)
    start, plans = dp_rank * steps * batch_size, []
    for quota in (b * batch_size for b in worker_batches(steps, num_workers)):
        spans = todo_slice(todo, start, quota)
        pieces = [piece for pos, n in spans for piece in pieces_for_range(order, pos, n)]
        after = (spans[-1][0] + spans[-1][1]) % total if spans else 0
        plans.append(WorkerPlan(pieces, quota, after, tuple(order), None))
        start += quota
    return plans


def repeated_order(order: list[Shard], global_samples: int, repeats: int) -> list[Shard]:
    """The first ceil(global_samples / repeats) samples of the epoch's sequence, as (possibly cut) shards."""
    left, out = -(-global_samples // repeats), []
    for s in order:
        if left <= 0:
            break
        out.append(Shard(s.url, min(s.samples, left)))
        left -= out[-1].samples
    return out


def steps_per_epoch(total: int, dp_size: int, batch_size: int, drop_last: bool, what: str) -> int:
    global_batch = dp_size * batch_size
    steps = total // global_batch if drop_last else -(-total // global_batch)
    if steps == 0:
        raise DataError(
            f"{what} has {total} samples, fewer than one global batch (dp_size {dp_size} x data.batch_size "
            f"{batch_size} = {global_batch}); lower data.batch_size or set data.drop_last=false"
        )
    return steps


def val_ranges(total: int, dp_size: int, dp_rank: int, batch_size: int, num_workers: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Validation: the rank's contiguous slice, cut into per-worker (first batch, batches, samples start).

    Returns (batches per rank, the same on every rank; [(start, stop, batches) per logical worker]) with
    start/stop global sample positions; batches past `stop` are padding.
    """
    lo, hi = dp_rank * total // dp_size, (dp_rank + 1) * total // dp_size
    longest = -(-total // dp_size)
    n_batches = -(-longest // batch_size)
    out, first = [], 0
    for count in worker_batches(n_batches, num_workers):
        start = min(hi, lo + first * batch_size)
        stop = min(hi, lo + (first + count) * batch_size)
        out.append((start, stop, count))
        first += count
    return n_batches, out
