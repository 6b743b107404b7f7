"""data.repeated_aug (DeiT's RASampler) in the exactly-once split: each sample of the epoch's subset is read
`repeated_aug` times, on different ranks, with its own augmentation on each; steps per epoch unchanged;
resume exact. Ranks are simulated in one process (the loader uses no collectives), as in test_data_loader."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import torch

from distvit.data.config import DataConfig
from distvit.data.errors import DataError
from distvit.data.loader import build_train_loader
from distvit.data.synthetic import decode_index, write_synthetic


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ra")
    write_synthetic(out, shard_sizes=[30, 10, 25, 11, 20], val=8)  # 96 samples, uneven shards
    return out


def cfg(root, **kw):
    base = dict(train=f"{root}/train-*.tar", val=f"{root}/val-*.tar", batch_size=4, num_workers=2, img_size=8,
                in_chans=1, mean=[0.0], std=[1.0], train_crop_scale=[1.0, 1.0], train_crop_ratio=[1.0, 1.0],
                shuffle_buffer=10, repeated_aug=2)
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("dp,k", [(2, 2), (4, 2), (4, 3)])
def test_each_sample_k_times_on_different_ranks(shards, dp, k):
    where = defaultdict(list)
    plain_steps = build_train_loader(cfg(shards, repeated_aug=1), dp_rank=0, dp_size=dp, seed=1).steps_per_epoch
    for r in range(dp):
        loader = build_train_loader(cfg(shards, repeated_aug=k), dp_rank=r, dp_size=dp, seed=1)
        assert loader.steps_per_epoch == plain_steps  # epoch length unchanged
        batches = [decode_index(x) for x, _ in loader]
        assert len(batches) == plain_steps
        for i in sum(batches, []):
            where[i].append(r)
    per_rank = plain_steps * 4
    assert sum(len(v) for v in where.values()) == dp * per_rank
    counts = Counter(len(v) for v in where.values())
    if per_rank % k == 0:  # exact when k divides steps x batch
        assert counts == {k: dp * per_rank // k}
    assert all(len(set(v)) == len(v) for v in where.values())  # the copies are on different ranks


def test_copies_get_different_augmentations_and_resume_is_exact(shards):
    aug = cfg(shards, train_crop_scale=[0.3, 1.0], reprob=0.5, num_workers=2)
    ranks = [torch.cat([x for x, _ in build_train_loader(aug, dp_rank=r, dp_size=2, seed=4)]) for r in range(2)]
    same = cfg(shards, num_workers=2)
    idx = [sorted(sum((decode_index(x) for x, _ in build_train_loader(same, dp_rank=r, dp_size=2, seed=4)), []))
           for r in range(2)]
    assert idx[0] == idx[1]  # dp 2, k 2: both ranks hold the same samples ...
    assert sorted(ranks[0].flatten(1).tolist()) != sorted(ranks[1].flatten(1).tolist())  # ... augmented differently
    full = [x.clone() for x, _ in build_train_loader(aug, dp_rank=1, dp_size=2, seed=4)]
    first = build_train_loader(aug, dp_rank=1, dp_size=2, seed=4)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = build_train_loader(aug, dp_rank=1, dp_size=2, seed=4)
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(full) - 5 and all(torch.equal(a, b) for a, b in zip(rest, full[5:]))


def test_refusals(shards):
    with pytest.raises(DataError, match=r"data.repeated_aug=3 .* 2 data-parallel ranks; set data.repeated_aug <= 2"):
        build_train_loader(cfg(shards, repeated_aug=3), dp_rank=0, dp_size=2, seed=0)
    with pytest.raises(ValueError, match=r"data.repeated_aug=2 needs data.shard_split=samples"):
        cfg(shards, shard_split="shards")
