"""data.packing: the loader packs images at their own size; exactly once per epoch, equal steps, bitwise resume.

The shards here hold images of many sizes and aspect ratios whose label is their sample number and
whose pixels all equal it (mod 251), so a yielded batch says which samples it holds and that their
pixels are theirs.
"""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from distvit.data.config import DataConfig
from distvit.data.errors import DataError
from distvit.data.loader import build_train_loader, build_val_loader
from distvit.data.pack_plan import balance, greedy_batches
from distvit.data.packing import pack

N = 45
PATCH = 2


def _write(path, ids):
    with tarfile.open(path, "w") as tar:
        for i in ids:
            h, w = 4 + (i * 3) % 13, 4 + (i * 7) % 17  # 4..16 x 4..20, many aspect ratios
            buf = io.BytesIO()
            Image.fromarray(np.full((h, w), i % 251, np.uint8), "L").save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    _write(d / "train-0.tar", range(0, 20))
    _write(d / "train-1.tar", range(20, N))
    _write(d / "val-0.tar", range(0, 13))
    return d


def _cfg(d, **packing):
    p = dict(max_tokens=64, min_side=4, max_side=16, resize="native")
    p.update(packing)
    return DataConfig(train=f"{d}/train-*.tar", val=f"{d}/val-*.tar", batch_size=2, num_workers=2,
                      mean=[0.0], std=[1.0], packing=p)


def _epoch(cfg, rank, dp, epoch=0, state=None, stop=None):
    loader = build_train_loader(cfg, dp_rank=rank, dp_size=dp, seed=3, patch_size=PATCH, num_classes=1000)
    if state is not None:
        loader.load_state_dict(state)
    loader.set_epoch(epoch)
    out = []
    for packed, labels in loader:
        out.append((packed, labels))
        if stop is not None and len(out) == stop:
            return out, loader.state_dict()
    return out, loader


def _pixels_are_their_labels(packed, labels):
    # Every real patch of image i has all pixels (normalised with mean 0, std 1: x / 255) = label_i / 255.
    for i, lab in enumerate(labels.tolist()):
        mask = packed.image_ids == i
        assert mask.sum() == packed.grid_sizes[i].prod()
        got = packed.patches[mask]
        torch.testing.assert_close(got, torch.full_like(got, (lab % 251) / 255.0), rtol=0, atol=1e-6)


def test_every_sample_once_over_two_ranks_and_two_workers_with_equal_steps(mixed_dir):
    cfg = _cfg(mixed_dir)
    seen, steps = [], []
    for rank in range(2):
        batches, loader = _epoch(cfg, rank, 2)
        steps.append(len(batches))
        assert len(batches) == loader.steps_per_epoch
        for packed, labels in batches:
            assert packed.num_sequences <= cfg.batch_size and int(packed.seq_lens.max()) <= 64
            _pixels_are_their_labels(packed, labels)
            seen += labels.tolist()
    assert steps[0] == steps[1]
    assert sorted(seen) == list(range(N))
    # Native size: an image whose sides are within [min_side, max_side] keeps its size (rounded to the patch).
    packed, labels = _epoch(cfg, 0, 2)[0][0]
    for (gh, gw), lab in zip(packed.grid_sizes.tolist(), labels.tolist()):
        h, w = 4 + (lab * 3) % 13, 4 + (lab * 7) % 17
        scale = min(1.0, 16 / max(h, w))
        assert (gh * PATCH, gw * PATCH) == tuple(max(PATCH, round(s * scale / PATCH) * PATCH) for s in (h, w))


def test_the_epochs_differ_and_random_res_draws_per_sample_and_epoch(mixed_dir):
    cfg = _cfg(mixed_dir, resize="random_res")
    sizes = []
    for epoch in (0, 1):
        batches, _ = _epoch(cfg, 0, 1, epoch=epoch)
        labels = torch.cat([lab for _, lab in batches])
        assert sorted(labels.tolist()) == list(range(N))
        grids = torch.cat([p.grid_sizes for p, _ in batches])
        sizes.append(dict(zip(labels.tolist(), map(tuple, grids.tolist()))))
    assert sizes[0] != sizes[1]  # new draws each epoch
    native = _epoch(_cfg(mixed_dir), 0, 1)[0]
    assert dict(zip(torch.cat([lab for _, lab in native]).tolist(),
                    map(tuple, torch.cat([p.grid_sizes for p, _ in native]).tolist()))) != sizes[0]


@pytest.mark.parametrize("resize", ["native", "random_res"])
def test_resume_mid_epoch_is_bitwise_and_does_not_depend_on_workers(mixed_dir, resize):
    cfg = _cfg(mixed_dir, resize=resize)
    cfg.hflip, cfg.batch_size = 0.5, 1
    full, _ = _epoch(cfg, 1, 2, epoch=1)
    assert len(full) >= 4
    head, state = _epoch(cfg, 1, 2, epoch=1, stop=3)
    assert state["step"] == 3 and state["epoch"] == 1
    cfg0 = cfg.model_copy(update={"num_workers": 0})  # the plan does not depend on the worker count
    tail, _ = _epoch(cfg0, 1, 2, epoch=1, state=state)
    assert len(head) + len(tail) == len(full)
    for (a, la), (b, lb) in zip(full, head + tail):
        assert torch.equal(la, lb)
        for name in ("patches", "positions", "image_ids", "seq_lens", "grid_sizes", "image_slots", "step_grids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_resume_refuses_other_packing_settings(mixed_dir):
    _, state = _epoch(_cfg(mixed_dir), 0, 2, stop=1)
    loader = build_train_loader(_cfg(mixed_dir, max_tokens=80), dp_rank=0, dp_size=2, seed=3, patch_size=PATCH)
    with pytest.raises(DataError, match="packing: saved"):
        loader.load_state_dict(state)


def test_step_grids_are_every_rank_s_images_of_the_step(mixed_dir):
    cfg = _cfg(mixed_dir)
    r0, _ = _epoch(cfg, 0, 2)
    r1, _ = _epoch(cfg, 1, 2)
    for (a, _), (b, _) in zip(r0, r1):
        both = torch.cat([a.grid_sizes, b.grid_sizes])
        assert torch.equal(a.step_grids, both) and torch.equal(b.step_grids, both)


def test_val_is_exact_every_image_once_at_native_size(mixed_dir):
    cfg = _cfg(mixed_dir)
    labels, counts = [], []
    for rank in range(2):
        loader = build_val_loader(cfg, dp_rank=rank, dp_size=2, patch_size=PATCH)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == len(loader)
        for packed, lab, valid in batches:
            assert valid.all() and len(valid) == len(lab) == packed.num_images
            _pixels_are_their_labels(packed, lab)
            labels += lab.tolist()
    assert counts[0] == counts[1]
    assert sorted(labels) == list(range(13))


def test_greedy_batches_respect_the_budget_and_pack_reproduces_their_rows():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 40, size=200).tolist()
    batches = greedy_batches(tokens, rows=3, max_tokens=40, lookahead=8)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        imgs = [torch.zeros(1, 2, 2 * tokens[i]) for i in b]
        packed = pack(imgs, 2, 40)
        assert packed.num_sequences <= 3
    fill = sum(tokens) / (len(batches) * 3 * 40)
    plain = greedy_batches(tokens, rows=3, max_tokens=40, lookahead=1)
    assert len(batches) < len(plain) and fill > 0.85  # the look-ahead fills what plain greedy leaves empty
    even = balance(batches, 4, "x")
    assert len(even) % 4 == 0 and sorted(i for b in even for i in b) == list(range(200))


def test_packing_config_errors_name_the_field(mixed_dir):
    with pytest.raises(ValueError, match="data.mixup needs square"):
        DataConfig(packing={"max_tokens": 64}, mixup=0.8)
    with pytest.raises(ValueError, match="min_side=64 is above max_side=32"):
        DataConfig(packing={"min_side": 64, "max_side": 32})
    loader_cfg = _cfg(mixed_dir, max_tokens=8)  # 16 px sides are 64 patches of 2 px
    with pytest.raises(DataError, match="raise data.packing.max_tokens to >= "):
        build_train_loader(loader_cfg, dp_rank=0, dp_size=1, seed=0, patch_size=PATCH)
