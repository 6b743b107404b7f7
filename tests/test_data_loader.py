"""Train/val loaders: split over ranks and workers, determinism, exact resume, equal step counts.

Samples carry their index in their first two pixels (distvit.data.synthetic); with an identity
transform (crop scale and ratio [1, 1], no flip, mean 0, std 1) each batch tells which samples it holds.
Ranks are simulated in one process by building loaders with dp_rank 0 and 1 (the loader itself uses
no collectives); one test runs them as real processes.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from distvit.data.config import DataConfig
from distvit.data.loader import build_train_loader, build_val_loader
from distvit.data.synthetic import decode_index, write_synthetic

UNEVEN = [30, 10, 25, 11, 20]  # 96 samples in 5 shards: no whole-shard split of 2 ranks x 2 workers is even


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    out = tmp_path_factory.mktemp("uneven")
    write_synthetic(out, shard_sizes=UNEVEN, val=37)
    return out


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    out = tmp_path_factory.mktemp("even")
    write_synthetic(out, shard_sizes=[12] * 8)
    return out


def ident_cfg(root, **kw) -> DataConfig:
    base = dict(train=f"{root}/train-*.tar", val=f"{root}/val-*.tar", batch_size=4, num_workers=2, img_size=8,
                in_chans=1, mean=[0.0], std=[1.0], train_crop_scale=[1.0, 1.0], train_crop_ratio=[1.0, 1.0],
                hflip=0.0, shuffle_buffer=10)
    base.update(kw)
    return DataConfig(**base)


def epoch_indices(loader) -> list[list[int]]:
    return [decode_index(images) for images, _ in loader]


@pytest.mark.parametrize("split,fixture", [("samples", "uneven"), ("shards", "even")])
def test_two_ranks_two_workers_see_every_sample_once(split, fixture, request):
    root = request.getfixturevalue(fixture)
    cfg = ident_cfg(root, shard_split=split)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, dp_rank=rank, dp_size=2, seed=3)
        assert loader.steps_per_epoch == 96 // (2 * 4)
        batches = epoch_indices(loader)
        assert len(batches) == loader.steps_per_epoch
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(96))


def test_labels_travel_with_their_images(uneven):
    loader = build_train_loader(ident_cfg(uneven), dp_rank=1, dp_size=2, seed=0)
    for images, labels in loader:
        assert labels.dtype == torch.int64 and images.dtype == torch.float32
        assert labels.tolist() == [i % 10 for i in decode_index(images)]


def test_uneven_whole_shard_split_gives_equal_steps(uneven):
    """shard_split=shards with 5 shards over 2x2 slots: shares differ, steps must not."""
    cfg = ident_cfg(uneven, shard_split="shards")
    counts = Counter()
    lengths = []
    for rank in range(2):
        loader = build_train_loader(cfg, dp_rank=rank, dp_size=2, seed=1)
        batches = epoch_indices(loader)
        lengths.append(len(batches))
        counts.update(i for b in batches for i in b)
    assert lengths == [12, 12]
    assert sum(counts.values()) == 96 and set(counts) <= set(range(96))


def test_same_seed_same_order_next_epoch_another(uneven):
    cfg = ident_cfg(uneven, num_workers=0)
    a = build_train_loader(cfg, dp_rank=0, dp_size=2, seed=7)
    b = build_train_loader(cfg, dp_rank=0, dp_size=2, seed=7)
    first = epoch_indices(a)
    assert first == epoch_indices(b)
    a.set_epoch(1)
    second = epoch_indices(a)
    assert second != first
    c = build_train_loader(cfg, dp_rank=0, dp_size=2, seed=8)
    assert epoch_indices(c) != first
    # With shard_split=samples the worker count changes which process reads a sample, not which rank does.
    w2 = build_train_loader(ident_cfg(uneven, num_workers=2), dp_rank=0, dp_size=2, seed=7)
    assert sorted(sum(epoch_indices(w2), [])) == sorted(sum(first, []))


def test_augmentation_is_deterministic_and_varies(uneven):
    cfg = ident_cfg(uneven, num_workers=2, train_crop_scale=[0.3, 1.0], train_crop_ratio=[0.75, 1.33], hflip=0.5)
    runs = []
    for _ in range(2):
        loader = build_train_loader(cfg, dp_rank=0, dp_size=1, seed=5)
        runs.append(torch.cat([x for x, _ in loader]))
    assert torch.equal(runs[0], runs[1])
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([x for x, _ in loader]), runs[0])


@pytest.mark.parametrize("workers,stop_at", [(0, 3), (2, 1), (2, 4), (2, 9)])
def test_mid_epoch_resume_is_bitwise(uneven, workers, stop_at):
    """shuffle_buffer=10 < each share, so resumes land inside later blocks, not only the first."""
    cfg = ident_cfg(uneven, num_workers=workers, train_crop_scale=[0.3, 1.0], hflip=0.5)
    full = build_train_loader(cfg, dp_rank=1, dp_size=2, seed=11)
    reference = [(x.clone(), y.clone()) for x, y in full]

    first = build_train_loader(cfg, dp_rank=1, dp_size=2, seed=11)
    it = iter(first)
    for _ in range(stop_at):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores must survive JSON
    del it

    resumed = build_train_loader(cfg, dp_rank=1, dp_size=2, seed=11)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the trainer calls this after loading; it must keep the position
    rest = list(resumed)
    assert len(rest) == len(reference) - stop_at
    for (x, y), (rx, ry) in zip(rest, reference[stop_at:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def trainer_loop(loader, epoch, batches):
    """The trainer's pattern: set_epoch, iterate, next epoch; state_dict() right after each batch."""
    out = []
    while len(out) < batches:
        loader.set_epoch(epoch)
        for images, _ in loader:
            out.append((epoch, decode_index(images), json.loads(json.dumps(loader.state_dict()))))
            if len(out) == batches:
                return out
        epoch += 1
    return out


@pytest.mark.parametrize("stop_at", [12, 13])  # exactly at the end of epoch 0 (12 steps), one batch into epoch 1
def test_resume_around_the_epoch_end_in_the_trainer_loop(uneven, stop_at):
    cfg = ident_cfg(uneven)
    reference = trainer_loop(build_train_loader(cfg, dp_rank=0, dp_size=2, seed=2), 0, 30)
    epoch, _, state = reference[stop_at - 1]
    resumed = build_train_loader(cfg, dp_rank=0, dp_size=2, seed=2)
    resumed.load_state_dict(state)
    rest = trainer_loop(resumed, epoch, 30 - stop_at)
    assert [(e, idx) for e, idx, _ in rest] == [(e, idx) for e, idx, _ in reference[stop_at:]]


def test_iterating_again_without_set_epoch_repeats_the_epoch(uneven):
    loader = build_train_loader(ident_cfg(uneven), dp_rank=0, dp_size=2, seed=2)
    assert epoch_indices(loader) == epoch_indices(loader)


def test_resume_with_other_settings_is_refused(uneven):
    a = build_train_loader(ident_cfg(uneven), dp_rank=0, dp_size=2, seed=0)
    state = a.state_dict()
    b = build_train_loader(ident_cfg(uneven, batch_size=8), dp_rank=0, dp_size=2, seed=0)
    with pytest.raises(Exception, match=r"batch_size: saved 4, now 8"):
        b.load_state_dict(state)


def test_drop_last_false_covers_every_sample(uneven):
    cfg = ident_cfg(uneven, batch_size=5, drop_last=False)  # 96 / (2*5): 10 steps, 4 repeated samples
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, dp_rank=rank, dp_size=2, seed=0)
        assert loader.steps_per_epoch == 10
        seen += sum(epoch_indices(loader), [])
    assert len(seen) == 100 and set(seen) == set(range(96))


def test_too_few_samples_for_one_global_batch(uneven):
    with pytest.raises(Exception, match=r"has 96 samples, fewer than one global batch \(dp_size 4 x data.batch_size 32 = 128\)"):
        build_train_loader(ident_cfg(uneven, batch_size=32), dp_rank=0, dp_size=4, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_val_every_sample_once_and_equal_batches(uneven, workers):
    cfg = ident_cfg(uneven, num_workers=workers)
    valid_seen, n_batches = [], []
    for rank in range(2):
        loader = build_val_loader(cfg, dp_rank=rank, dp_size=2)
        assert loader.num_samples == 37
        batches = list(loader)
        n_batches.append(len(batches))
        for images, labels, valid in batches:
            assert valid.dtype == torch.bool and images.shape == (4, 1, 8, 8)
            idx = decode_index(images[valid])
            valid_seen += idx
            assert labels[valid].tolist() == [i % 10 for i in idx]
    assert n_batches == [5, 5]  # ceil(ceil(37 / 2) / 4)
    assert sorted(valid_seen) == list(range(96, 96 + 37))


@pytest.mark.multirank
def test_two_real_processes_split_the_epoch(uneven, tmp_path):
    import torch.multiprocessing as mp

    cfg = ident_cfg(uneven, num_workers=1)
    mp.start_processes(_rank_main, args=(cfg.model_dump(), str(tmp_path)), nprocs=2, start_method="spawn")
    seen = sum((json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)), [])
    assert sorted(seen) == list(range(96))


def _rank_main(rank, cfg_dict, out):
    loader = build_train_loader(DataConfig(**cfg_dict), dp_rank=rank, dp_size=2, seed=4)
    idx = sum(epoch_indices(loader), [])
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(idx, f)
