"""The rest of an epoch on another world size: the data half of `distvit ckpt reshape`.

Every (rank, worker) of an epoch reads a list of pieces of the epoch's sample sequence (shards in
their (seed, epoch) order, samples in tar order; data/shards.py), in blocks of `shuffle_buffer`
samples, each block permuted by a generator seeded with (seed, epoch, rank, worker, block). A
worker's cursor (data/pipeline.py) names the block it is in (its first sample's position) and how
many of the block's permuted samples it has taken. From the saved states of *all* old ranks we
therefore know the exact set of positions consumed:

    consumed(worker) = every position of its share before the current block
                     + the first `taken` positions of the current block's permutation

and the rest of the epoch is `todo = epoch set - consumed`, where the epoch set is the union of
every old share (the positions the epoch would have read). `todo` is kept as sorted runs of
positions ([start, length] pairs): a contiguous range for each untouched stretch, a few holes per
partly read block.

The new run splits `todo` exactly as an epoch is split (shards.train_plan, `todo=`): rank r of the
new dp size takes the todo-indices [r*S, (r+1)*S), S = its remaining batches x batch size, and its
logical workers sub-ranges of that, read in blocks and shuffled as usual. Every remaining sample
is read once over the new ranks x workers, and none already consumed again, when len(todo) is a
multiple of the new global batch; otherwise data.drop_last decides as it does for a whole epoch
(drop the last len(todo) mod global batch, or wrap round to the first of `todo`). The new batch
size and worker count may differ from the old ones: only the sequence must be the same (seed,
shards, shuffle, shard_split).

What cannot carry over: the *order* of the remaining samples (the blocks and their permutations
belong to the old ranks x workers); each sample's augmentation is seeded by (seed, epoch, shard,
key) alone (data/transforms.py sample_rng), so it is the one the old run would have drawn.
Samples read in a worker's overflow (its share ran short of good samples) belong to another
share and were already an extra read; they are not subtracted. DeiT's repeated augmentation
(data.repeated_aug > 1) places each sample on several ranks, so "consumed" has no single owner:
it is refused, and the resumed run restarts the epoch (the trainer says so).
"""
from __future__ import annotations

import numpy as np

from distvit.data.errors import DataError
from distvit.data.shards import Shard, epoch_order, stable_rng, todo_length, train_plan

RESHAPED = "reshaped"  # kind of a loader state that holds every old rank's state, to be re-split


def runs(positions: np.ndarray) -> list[list[int]]:
    """Sorted unique positions as [start, length] runs."""
    if positions.size == 0:
        return []
    p = np.unique(positions)
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [p.size]))
    return [[int(p[a]), int(b - a)] for a, b in zip(starts, ends)]


def positions_of(todo) -> np.ndarray:
    if not todo:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in todo])


def remainder_steps(todo, dp_size: int, batch_size: int, drop_last: bool) -> int:
    n, global_batch = todo_length(todo), dp_size * batch_size
    return n // global_batch if drop_last else -(-n // global_batch)


def _offsets(order: list[Shard]) -> dict[str, int]:
    out, pos = {}, 0
    for s in order:
        out.setdefault(s.url, pos)
        pos += s.samples
    return out


def _share(plan, offsets: dict[str, int]) -> np.ndarray:
    """The positions of a worker's primary share, in the order it reads them."""
    parts = [np.arange(offsets[p.url] + p.skip, offsets[p.url] + p.skip + p.take, dtype=np.int64)
             for p in plan.primary if p.take > 0]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rank_plans(state: dict, shards: list[Shard]):
    return train_plan(shards, seed=state["seed"], epoch=state["epoch"], shuffle=state["shuffle"],
                      split=state["shard_split"], dp_rank=state["dp_rank"], dp_size=state["dp_size"],
                      num_workers=state["num_workers"], batch_size=state["batch_size"],
                      steps=state.get("epoch_steps", state["steps_per_epoch"]), todo=state.get("todo"))


def rank_positions(state: dict, shards: list[Shard]) -> tuple[np.ndarray, np.ndarray]:
    """(every position the rank's shares hold this epoch, the positions it has consumed)."""
    order = epoch_order(shards, state["seed"], state["epoch"], state["shuffle"])
    offsets = _offsets(order)
    shares, consumed = [], []
    for w, plan in enumerate(rank_plans(state, shards)):
        flat = _share(plan, offsets)
        shares.append(flat)
        c = state["workers"][w] if w < len(state["workers"]) else None
        if not c:
            continue
        if c["overflow"] or c["good"] >= plan.quota:
            consumed.append(flat)  # the whole share (what overflow read is not ours: see the module doc)
            continue
        takes = np.cumsum([0] + [p.take for p in plan.primary])
        begin = int(takes[c["piece"]]) + int(c["item"]) if c["piece"] < len(takes) else flat.size
        consumed.append(flat[:begin])
        size = min(state["shuffle_buffer"], flat.size - begin)
        if size > 0 and c["taken"] > 0:
            perm = (stable_rng(state["seed"], state["epoch"], state["dp_rank"], w, c["block"], 0).permutation(size)
                    if state["shuffle"] else np.arange(size))
            consumed.append(flat[begin + perm[:c["taken"]]])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(shares), cat(consumed)


def check_states(states: list[dict], shards: list[Shard]) -> None:
    """The old ranks' states fit together and the sequence they read is this loader's."""
    if not states:
        raise DataError("the reshaped checkpoint holds no data-loader state")
    first = states[0]
    ranks = sorted(s["dp_rank"] for s in states)
    if ranks != list(range(first["dp_size"])):
        raise DataError(f"the reshaped checkpoint holds the data state of dp ranks {ranks}, not all "
                        f"{first['dp_size']}: it cannot say which samples are left")
    for key in ("epoch", "seed", "shuffle", "shard_split", "num_samples", "num_shards", "step"):
        if any(s[key] != first[key] for s in states):
            raise DataError(f"the old ranks' data states disagree on {key}; the checkpoint is inconsistent")
    if first.get("repeated_aug", 1) > 1:
        raise DataError("data.repeated_aug > 1 puts each sample on several ranks, so the rest of the epoch "
                        "cannot be re-split over another world size")
    if first["num_samples"] != sum(s.samples for s in shards) or first["num_shards"] != len(shards):
        raise DataError(f"the checkpoint's epoch read {first['num_samples']} samples in {first['num_shards']} "
                        f"shards, this run's data.train has {sum(s.samples for s in shards)} in {len(shards)}")


def remainder(states: list[dict], shards: list[Shard]) -> list[list[int]]:
    """The positions of the epoch not consumed by any old rank, as [start, length] runs."""
    check_states(states, shards)
    held, consumed = zip(*(rank_positions(s, shards) for s in states))
    held, consumed = np.concatenate(held), np.concatenate(consumed)
    return runs(np.setdiff1d(held, consumed))


def sequence_urls(state: dict, shards: list[Shard], todo) -> list[tuple[str, int]]:
    """(shard url, sample index in tar order) of todo positions: for tests and `ckpt inspect`."""
    order = epoch_order(shards, state["seed"], state["epoch"], state["shuffle"])
    bounds = np.cumsum([0] + [s.samples for s in order])
    out = []
    for p in positions_of(todo):
        i = int(np.searchsorted(bounds, p, side="right")) - 1
        out.append((order[i].url, int(p - bounds[i])))
    return out


def reshaped_state(states: list[dict]) -> dict:
    """What a reshaped checkpoint keeps for the data: every old dp rank's loader state, re-split on
    load by whichever world size resumes it (TrainLoader.load_state_dict)."""
    by_rank = {}
    for s in states:
        by_rank.setdefault(s["dp_rank"], s)  # the sp ranks of one dp rank hold the same state
    return {"kind": RESHAPED, "ranks": [by_rank[r] for r in sorted(by_rank)]}
