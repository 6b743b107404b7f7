"""The epoch plan of native-resolution (packed) loading: which images go into which packed batch, on which rank.

Packing needs every image's token count before the epoch starts (a rank cannot know how many
packed batches its share makes without it, and all ranks must do the same number of steps). So:

1. `build_index` reads every shard's tar headers once per loader: each sample's member offsets and
   its image's width x height (PIL reads the image header only, not the pixels).
2. `epoch_plan` orders the samples (a permutation from (seed, epoch)), gives each its target size
   (`packing.target_size`: native aspect ratio bounded by min_side/max_side; random_res draws the
   bound from the sample's own generator (seed, epoch, shard, key), as the square crop is drawn),
   then packs them greedily, in order, with a look-ahead of `lookahead` images: an image that fits
   no row of the open batch is kept aside while the next ones are tried; when none of the window
   fits, the batch is closed. Each batch holds at most `rows` rows of `max_tokens` patches, placed
   first-fit in batch order, which is exactly what `packing.pack` redoes on the images.
3. The batch count is made a multiple of dp_size by halving the batch with most images (as often as
   needed), and rank r takes batches r, r + dp, r + 2 dp, ... So every sample is in exactly one
   batch of one rank per epoch and every rank makes the same number of steps, whatever the sizes.

The batch count depends on the epoch's order and sizes, so epochs differ by a few steps (every rank
alike); `steps_per_epoch` of the loader is epoch 0's, the trainer's nominal epoch length.
The plan depends on (data, seed, epoch, packing settings, dp_size) only, not on workers: a resumed
run recomputes it and continues at its step, bitwise. Reading a planned sample seeks to its tar
members (local shards only: packed loading needs random access).
"""
from __future__ import annotations

import os
import tarfile
from collections import deque
from typing import NamedTuple

import numpy as np

from distvit.data.errors import DataError, log
from distvit.data.manifest import is_local, local_path
from distvit.data.packing import target_size
from distvit.data.shards import Shard, stable_rng
from distvit.data.transforms import IMAGE_EXTS, sample_rng


class Sample(NamedTuple):
    shard: int  # index into the shard list
    key: str
    members: tuple  # ((ext, offset, size), ...) of the sample's files in the tar
    width: int  # image size from its header; 0: the image header could not be read (a bad sample)
    height: int


class Planned(NamedTuple):
    sample: int  # index into the index
    height: int  # target size (multiples of the patch)
    width: int
    flip: bool


def _image_size(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(tar.extractfile(member)) as img:  # header only
            return img.width, img.height
    except Exception:
        return 0, 0


def shard_index(url: str, shard_no: int) -> list[Sample]:
    """The samples of one local tar, in tar order."""
    from webdataset.tariterators import base_plus_ext

    out: list[Sample] = []
    key, members, image = None, [], None

    def close():
        if key is not None:
            w, h = _image_size(tar, image) if image is not None else (0, 0)
            out.append(Sample(shard_no, key, tuple(members), w, h))

    with tarfile.open(local_path(url), "r:") as tar:
        for m in tar:
            if not m.isreg() or (os.path.basename(m.name).startswith("__") and m.name.endswith("__")):
                continue
            k, ext = base_plus_ext(m.name)
            if k is None:
                continue
            if k != key:
                close()
                key, members, image = k, [], None
            members.append((ext.lower(), m.offset_data, m.size))
            if image is None and ext.lower() in IMAGE_EXTS:
                image = m
        close()
    return out


_INDEX_CACHE: dict[tuple, list[Sample]] = {}


def build_index(shards: list[Shard], what: str) -> list[Sample]:
    """Every sample of the shards with its image size (cached per process by path, size and mtime)."""
    remote = [s.url for s in shards if not is_local(s.url)]
    if remote:
        raise DataError(f"data.packing reads samples by their tar offsets, so {what} must be local files; "
                        f"'{remote[0]}' is not; copy the shards to a local disk or set data.packing=null")
    out: list[Sample] = []
    for no, s in enumerate(shards):
        path = local_path(s.url)
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, no)
        if key not in _INDEX_CACHE:
            _INDEX_CACHE[key] = shard_index(s.url, no)
        out.extend(_INDEX_CACHE[key])
    return out


def _targets(index: list[Sample], shards: list[Shard], packing, patch: int, seed: int, epoch: int,
             hflip: float, randomize: bool) -> list[Planned | None]:
    """Each sample's target size and flip (None: a bad image header)."""
    lo = -(-packing.min_side // patch) * patch
    choices = list(range(lo, packing.max_side + 1, patch)) or [packing.max_side]
    out: list[Planned | None] = []
    for i, s in enumerate(index):
        if not s.width or not s.height:
            out.append(None)
            continue
        bound, flip = packing.max_side, False
        if randomize and (packing.resize == "random_res" or hflip > 0):
            rng = sample_rng(seed, epoch, shards[s.shard].url, s.key)
            if packing.resize == "random_res":
                bound = choices[rng.randrange(len(choices))]
            flip = hflip > 0 and rng.random() < hflip
        h, w = target_size(s.height, s.width, patch, packing.min_side, bound, "native")
        out.append(Planned(i, h, w, flip))
    return out


def greedy_batches(tokens: list[int], rows: int, max_tokens: int, lookahead: int) -> list[list[int]]:
    """Positions of `tokens` grouped into batches of at most `rows` rows of `max_tokens` (see module doc)."""
    batches: list[list[int]] = []
    cur: list[int] = []
    fill = [0] * rows
    pending: deque[int] = deque()
    nxt = 0
    while nxt < len(tokens) or pending:
        while len(pending) < lookahead and nxt < len(tokens):
            pending.append(nxt)
            nxt += 1
        placed = None
        for j, pos in enumerate(pending):
            for r in range(rows):
                if fill[r] + tokens[pos] <= max_tokens:
                    fill[r] += tokens[pos]
                    placed = j
                    break
            if placed is not None:
                break
        if placed is None:  # nothing in the window fits: close the batch (an empty one cannot happen)
            batches.append(cur)
            cur, fill = [], [0] * rows
            continue
        cur.append(pending[placed])
        del pending[placed]
    if cur:
        batches.append(cur)
    return batches


def balance(batches: list[list], dp_size: int, what: str) -> list[list]:
    """Halve the batch with most images until the count divides dp_size (equal steps on every rank)."""
    batches = [list(b) for b in batches]
    while len(batches) % dp_size:
        i = max(range(len(batches)), key=lambda k: len(batches[k]))
        b = batches[i]
        if len(b) < 2:
            raise DataError(f"{what} packs into {len(batches)} batch(es) of one image each, fewer than the "
                            f"{dp_size} data-parallel ranks; use fewer ranks or more data")
        batches[i:i + 1] = [b[:len(b) // 2], b[len(b) // 2:]]
    return batches


class EpochPlan(NamedTuple):
    batches: list[list[Planned]]  # every rank's batches, global order (rank r: batches[r::dp])
    bad: int  # samples left out because their image header could not be read
    fill: float  # real patches / (batches x rows x max_tokens)

    def rank_batches(self, dp_rank: int, dp_size: int) -> list[list[Planned]]:
        return self.batches[dp_rank::dp_size]

    def step_grids(self, step: int, dp_size: int, patch: int) -> np.ndarray:
        """(M, 2) patch grids of every image that all dp ranks see at `step` (img/s and FLOPs of the step)."""
        grid = [(p.height // patch, p.width // patch) for b in self.batches[step * dp_size:(step + 1) * dp_size]
                for p in b]
        return np.asarray(grid, dtype=np.int64).reshape(-1, 2)


def epoch_plan(index: list[Sample], shards: list[Shard], packing, *, patch: int, rows: int, seed: int, epoch: int,
               shuffle: bool, hflip: float, dp_size: int, randomize: bool, what: str) -> EpochPlan:
    planned = _targets(index, shards, packing, patch, seed, epoch, hflip, randomize)
    order = stable_rng(seed, epoch, 0x9AC4).permutation(len(index)) if shuffle else np.arange(len(index))
    good = [planned[i] for i in order if planned[i] is not None]
    if not good:
        raise DataError(f"{what}: no sample has a readable image; check the shards with `distvit data verify`")
    tokens = [(p.height // patch) * (p.width // patch) for p in good]
    too_big = max(tokens)
    if too_big > packing.max_tokens:
        raise DataError(f"data.packing: an image resized to at most max_side={packing.max_side} px has {too_big} "
                        f"patches of {patch} px, more than max_tokens={packing.max_tokens}; raise data.packing."
                        f"max_tokens to >= {too_big} or lower data.packing.max_side")
    groups = balance(greedy_batches(tokens, rows, packing.max_tokens, packing.lookahead), dp_size, what)
    batches = [[good[k] for k in g] for g in groups]
    fill = sum(tokens) / (len(batches) * rows * packing.max_tokens)
    bad = len(planned) - len(good)
    if bad:
        log.warning("%s: %d sample(s) have no readable image header and are left out of the epoch", what, bad)
    return EpochPlan(batches, bad, fill)
