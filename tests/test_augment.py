"""Augmentation (distvit/data/augment.py) against timm's own functions, and determinism in the loader.

timm's ops draw from the global `random` / `numpy.random` / torch state; ours from a per-sample
`Draws`. Seeding both identically must give byte-identical images: that checks the op set, the
level-to-argument maps, the `mstd` noise and the order of every draw at once.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from distvit.data.augment import ColorJitter, Draws, RandomErasing, TrivialAugmentWide, aa_hparams, parse_auto_augment
from distvit.data.config import DataConfig
from distvit.data.loader import build_train_loader
from distvit.data.synthetic import write_synthetic

SEEDS = range(40)


def sample_image(mode: str, size: int = 24) -> Image.Image:
    rs = np.random.RandomState(0)
    yy, xx = np.mgrid[0:size, 0:size]
    base = (xx * 7 + yy * 3) % 256
    if mode == "L":
        return Image.fromarray((base + rs.randint(0, 40, base.shape)).clip(0, 255).astype(np.uint8), "L")
    rgb = np.stack([base, (255 - base), (xx * 11) % 256], -1) + rs.randint(0, 40, (size, size, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def timm_hparams(mode: str, size: int) -> dict:
    mean = (0.485, 0.456, 0.406) if mode == "RGB" else (0.5,)
    fill = tuple(min(255, round(255 * x)) for x in mean)
    return dict(translate_const=int(size * 0.45), img_mean=fill if mode == "RGB" else fill[0],
                interpolation=Image.BILINEAR), mean


@pytest.fixture
def timm_aa(timm_module, monkeypatch):
    """timm's auto_augment with posterize at 0 bits as older Pillow did it (Pillow >= 10 raises there,
    which crashes timm's RandAugment at magnitude 10 with inc1); every other op is timm's own."""
    from timm.data import auto_augment as ta

    def posterize(img, bits, **_):
        return img if bits >= 8 else (ta.ImageOps.posterize(img, bits) if bits >= 1 else img.point(lambda _: 0))

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        monkeypatch.setitem(ta.NAME_TO_OP, name, posterize)
    return ta


def compare(timm_fn, ours, img, mode, min_changed=0.5):
    changed = 0
    for s in SEEDS:
        random.seed(s), np.random.seed(s)
        expected = np.asarray(timm_fn(img))
        got = np.asarray(ours(img, Draws.seeded(s)))
        assert got.shape == expected.shape and np.array_equal(got, expected), f"seed {s}"
        changed += not np.array_equal(got, np.asarray(img))
    assert changed >= min_changed * len(SEEDS)  # the comparison was not of identities


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("text", ["rand-m9-mstd0.5-inc1", "rand-m9-n3-mstd0.5", "rand-m7-mstd101-mmax8", "augmix-m3-w3"])
def test_rand_augment_and_augmix_match_timm(timm_aa, mode, text):
    ta = timm_aa
    img = sample_image(mode)
    hp, mean = timm_hparams(mode, img.width)
    make = ta.augment_and_mix_transform if text.startswith("augmix") else ta.rand_augment_transform
    ours = parse_auto_augment(text, aa_hparams(img.width, mean, "bilinear", 3 if mode == "RGB" else 1))
    compare(make(text, dict(hp, translate_pct=0.3) if text.startswith("augmix") else hp), ours, img, mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_three_augment_matches_timm_3a(timm_aa, mode):
    ta = timm_aa
    img = sample_image(mode)
    hp, mean = timm_hparams(mode, img.width)
    ours = parse_auto_augment("3a", aa_hparams(img.width, mean, "bilinear", 3 if mode == "RGB" else 1))
    compare(ta.auto_augment_transform("3a", hp), ours, img, mode)


def test_random_erasing_matches_timm(timm_module):
    from timm.data.random_erasing import RandomErasing as TimmErasing

    x = torch.randn(3, 16, 16)
    for mode in ("pixel", "rand", "const"):
        erased = 0
        for s in SEEDS:
            random.seed(s), torch.manual_seed(s)
            expected = TimmErasing(0.7, mode=mode, device="cpu")(x.clone())
            got = RandomErasing(0.7, mode)(x.clone(), Draws.seeded(s), torch.Generator().manual_seed(s))
            assert torch.equal(got, expected), (mode, s)
            erased += not torch.equal(got, x)
        assert 0.4 * len(SEEDS) < erased < len(SEEDS)  # probability 0.7 both ways


def test_trivial_augment_and_color_jitter_by_hand():
    img = sample_image("RGB")
    ta = TrivialAugmentWide(aa_hparams(img.width, (0.5, 0.5, 0.5), "bilinear", 3))
    outs = {np.asarray(ta(img, Draws.seeded(s))).tobytes() for s in SEEDS}
    assert len(outs) > 20  # one op of 14 at one of 31 magnitudes: the seeds must give many images
    # Identity is op 0: a draw that picks it returns the image untouched.
    d = Draws(random.Random(0), None)
    d.py.randrange = lambda n: 0
    assert ta(img, d) is img
    # Colour jitter of strength 0 is the identity; strength s gives brightness factors in [1-s, 1+s].
    assert np.array_equal(np.asarray(ColorJitter(0.0)(img, Draws.seeded(1))), np.asarray(img))
    grey = Image.new("L", (4, 4), 100)
    values = {np.asarray(ColorJitter([0.5, 0, 0])(grey, Draws.seeded(s)))[0, 0] for s in SEEDS}
    assert min(values) >= 50 and max(values) <= 150 and len(values) > 10


def test_bad_auto_augment_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"data.auto_augment: 'q3' in 'rand-m9-q3' is not one of"):
        DataConfig(auto_augment="rand-m9-q3")
    with pytest.raises(ValueError, match=r"'autoaug' is not a supported auto-augment; use rand-m9"):
        DataConfig(auto_augment="autoaug")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("aug")
    write_synthetic(out, shard_sizes=[30, 10, 25, 11, 20], val=8)
    return out


ALL_ON = dict(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5, remode="pixel", three_augment=True,
              color_jitter=0.3, hflip=0.5)


def aug_cfg(root, **kw):
    base = dict(train=f"{root}/train-*.tar", val=f"{root}/val-*.tar", batch_size=4, num_workers=2, img_size=8,
                in_chans=1, mean=[0.5], std=[0.5], shuffle_buffer=10, **ALL_ON)
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("workers,stop_at", [(0, 3), (2, 5)])
def test_resume_is_bitwise_with_every_augmentation_on(shards, workers, stop_at):
    cfg = aug_cfg(shards, num_workers=workers)
    reference = [x.clone() for x, _ in build_train_loader(cfg, dp_rank=1, dp_size=2, seed=4)]
    plain = [x for x, _ in build_train_loader(aug_cfg(shards, num_workers=workers, auto_augment=None, reprob=0.0,
                                                      three_augment=False, color_jitter=None), dp_rank=1, dp_size=2, seed=4)]
    assert not all(torch.equal(a, b) for a, b in zip(reference, plain))  # augmentation did something
    first = build_train_loader(cfg, dp_rank=1, dp_size=2, seed=4)
    it = iter(first)
    for _ in range(stop_at):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = build_train_loader(cfg, dp_rank=1, dp_size=2, seed=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(reference) - stop_at
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[stop_at:]))


def test_augmentation_does_not_depend_on_the_worker_count(shards):
    """The per-sample generator: which worker reads a sample changes nothing (shard_split=samples)."""
    one = torch.cat([x for x, _ in build_train_loader(aug_cfg(shards, num_workers=1), dp_rank=0, dp_size=1, seed=3)])
    two = torch.cat([x for x, _ in build_train_loader(aug_cfg(shards, num_workers=2), dp_rank=0, dp_size=1, seed=3)])
    assert sorted(one.flatten(1).tolist()) == sorted(two.flatten(1).tolist())
