"""The data cursor across world sizes (distvit/data/remap.py): the rest of an epoch, re-split.

Ranks are simulated in one process (as tests/test_data_loader.py does); each batch names its
samples (distvit.data.synthetic). A phase runs every rank of a world for some steps, saves each
rank's loader state through JSON (as a checkpoint does), and the next phase, on another dp size,
batch size and worker count, loads all of them (`remap.reshaped_state`, what `ckpt reshape` and the
elastic resume store) and goes on.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest

from distvit.data import remap
from distvit.data.errors import DataError
from distvit.data.loader import build_train_loader
from distvit.data.synthetic import decode_index, write_synthetic
from test_data_loader import ident_cfg

UNEVEN = [30, 10, 25, 11, 20]  # 96 samples


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    out = tmp_path_factory.mktemp("uneven")
    write_synthetic(out, shard_sizes=UNEVEN)
    return out


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    out = tmp_path_factory.mktemp("even")
    write_synthetic(out, shard_sizes=[12] * 8)
    return out


def phase(cfg, dp_size: int, steps: int | None, state: dict | None, seed: int = 5):
    """Every rank of a dp_size world takes `steps` batches (None: to the end of the epoch) from
    `state`; returns (samples seen, in order, per rank; the ranks' states as a checkpoint keeps them)."""
    seen, states = [], []
    for rank in range(dp_size):
        loader = build_train_loader(cfg, dp_rank=rank, dp_size=dp_size, seed=seed)
        if state is not None:
            loader.load_state_dict(state)
        loader.set_epoch(0)  # as the trainer does after loading: keeps the position
        got = []
        for images, _ in loader:
            got.append(decode_index(images))
            if steps is not None and len(got) == steps:
                break
        seen.append(got)
        states.append(json.loads(json.dumps(loader.state_dict())))
    return seen, states


def flat(seen) -> list[int]:
    return [i for rank in seen for batch in rank for i in batch]


@pytest.mark.parametrize("split,fixture", [("samples", "uneven"), ("shards", "even")])
def test_2_to_3_to_2_ranks_sees_every_sample_of_the_epoch_once(split, fixture, request):
    """2 ranks x 2 workers, batch 4 (12 steps an epoch): 3 steps; then 3 ranks x 3 workers: 2 steps
    (72 left = 6 steps of 12); then 2 ranks x 1 worker: the rest (48 = 6 steps of 8). shuffle_buffer 10
    is smaller than every share, so the cursors stop inside later blocks, with holes."""
    root = request.getfixturevalue(fixture)
    base = dict(shard_split=split, shuffle_buffer=10)
    s1, st1 = phase(ident_cfg(root, num_workers=2, **base), 2, 3, None)
    s2, st2 = phase(ident_cfg(root, num_workers=3, **base), 3, 2, remap.reshaped_state(st1))
    assert [len(r) for r in s2] == [2, 2, 2] and all(len(b) == 4 for r in s2 for b in r)
    assert st2[0]["epoch_steps"] == 6 and st2[0]["todo"] is not None
    s3, st3 = phase(ident_cfg(root, num_workers=0, **base), 2, None, remap.reshaped_state(st2))
    assert [len(r) for r in s3] == [6, 6]
    seen = flat(s1) + flat(s2) + flat(s3)
    assert Counter(seen) == Counter(range(96))  # every sample once: none repeated, none skipped
    # the last phase ended the epoch: the loaders go on with epoch 1, whole, on the new world
    assert all(s["step"] == s["epoch_steps"] for s in st3)


def test_the_remainder_is_what_an_uninterrupted_run_had_left(uneven):
    """The set left after 5 steps of 2 ranks equals the samples those ranks would have read in their
    last 7 steps (the consumed set includes the partly read blocks' permuted picks exactly)."""
    cfg = ident_cfg(uneven, num_workers=2, shuffle_buffer=7)
    full, _ = phase(cfg, 2, None, None)
    _, states = phase(cfg, 2, 5, None)
    later = sorted(i for rank in full for batch in rank[5:] for i in batch)
    new, _ = phase(ident_cfg(uneven, num_workers=1, batch_size=7), 1, None, remap.reshaped_state(states))
    assert sorted(flat(new)) == later  # 56 samples = 8 steps of 7


def test_a_remainder_that_is_not_a_multiple_of_the_new_global_batch(uneven):
    """72 left over 3 ranks x 5 (global batch 15): drop_last reads 60 of them once (4 steps);
    drop_last=false reads all 72 and wraps round to the first ones to fill its 5th step (75 slots)."""
    seen, states = phase(ident_cfg(uneven), 2, 3, None)
    done = remap.reshaped_state(states)
    left = set(range(96)) - set(flat(seen))
    dropped, _ = phase(ident_cfg(uneven, batch_size=5), 3, None, done)
    assert len(flat(dropped)) == 60 and len(set(flat(dropped))) == 60 and set(flat(dropped)) <= left
    padded, _ = phase(ident_cfg(uneven, batch_size=5, drop_last=False), 3, None, done)
    assert len(flat(padded)) == 75 and set(flat(padded)) == left


def test_a_state_saved_after_the_remainder_resumes_bitwise_on_the_same_world(uneven):
    cfg = ident_cfg(uneven, num_workers=2)
    _, st1 = phase(cfg, 2, 3, None)
    reshaped = remap.reshaped_state(st1)
    full, _ = phase(cfg, 3, None, reshaped)
    _, mid = phase(cfg, 3, 2, reshaped)
    rest = []
    for rank in range(3):
        loader = build_train_loader(cfg, dp_rank=rank, dp_size=3, seed=5)
        loader.load_state_dict(mid[rank])
        loader.set_epoch(0)
        rest.append([decode_index(x) for x, _ in loader])
    assert rest == [r[2:] for r in full]


def test_reshape_at_the_epoch_end_moves_on_to_the_next_epoch(uneven):
    _, states = phase(ident_cfg(uneven), 2, None, None)
    loader = build_train_loader(ident_cfg(uneven), dp_rank=0, dp_size=3, seed=5)
    loader.load_state_dict(remap.reshaped_state(states))
    loader.set_epoch(0)
    assert list(loader) == []
    loader.set_epoch(1)
    assert len(list(loader)) == loader.steps_per_epoch


def test_another_sequence_is_refused(uneven):
    _, states = phase(ident_cfg(uneven), 2, 3, None)
    loader = build_train_loader(ident_cfg(uneven), dp_rank=0, dp_size=3, seed=6)
    with pytest.raises(DataError, match="run.seed, data.shuffle or data.shard_split differ"):
        loader.load_state_dict(remap.reshaped_state(states))
    with pytest.raises(DataError, match="not all 2"):
        remap.remainder(states[:1], loader.shards)


def test_runs_and_slices():
    import numpy as np

    assert remap.runs(np.array([5, 1, 2, 3, 9, 8])) == [[1, 3], [5, 1], [8, 2]]
    todo = [[1, 3], [5, 1], [8, 2]]
    from distvit.data.shards import todo_slice

    assert todo_slice(todo, 2, 3) == [(3, 1), (5, 1), (8, 1)]
    assert todo_slice(todo, 5, 3) == [(9, 1), (1, 2)]  # cyclic: padding wraps to the start


def test_repeated_augmentation_is_refused_with_the_reason(uneven):
    """Each sample sits on several ranks (DeiT's RASampler): consumed has no single owner."""
    _, states = phase(ident_cfg(uneven, repeated_aug=2, num_workers=0), 2, 3, None)
    loader = build_train_loader(ident_cfg(uneven, num_workers=0), dp_rank=0, dp_size=3, seed=5)
    with pytest.raises(DataError, match=r"data.repeated_aug > 1 puts each sample on several ranks"):
        loader.load_state_dict(remap.reshaped_state(states))
    assert loader.epoch == 0 and loader.stats()["step_in_epoch"] == 0  # untouched: the epoch restarts
