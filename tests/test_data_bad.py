"""Bad data never hangs and is never silent: skip (warn, count) or raise, as data.on_error says."""
from __future__ import annotations

import logging
import os
import tarfile
import time

import pytest
from webdataset import TarWriter

from distvit.data import pipeline
from distvit.data.config import DataConfig
from distvit.data.errors import DataError
from distvit.data.loader import build_train_loader, build_val_loader
from distvit.data.synthetic import decode_index, encode, synthetic_image, write_synthetic
from distvit.data.write import Record, write_dataset

import numpy as np
import torch

SIZES = [30, 10, 25, 11, 20]  # shard 2 holds samples 40..64


def cfg_for(root, **kw) -> DataConfig:
    base = dict(train=f"{root}/train-*.tar", val=f"{root}/val-*.tar", batch_size=4, num_workers=0, img_size=8,
                in_chans=1, mean=[0.0], std=[1.0], train_crop_scale=[1.0, 1.0], train_crop_ratio=[1.0, 1.0],
                shuffle=False, shuffle_buffer=8)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture()
def truncated(tmp_path):
    """Shard 2 cut inside the image of sample 50: 40..49 whole, 50 partial (cls, json), 51..64 gone."""
    write_synthetic(tmp_path, shard_sizes=SIZES)
    shard = tmp_path / "train-000002.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember("s000050.png")
    with open(shard, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)
    return tmp_path


def test_truncated_tar_is_skipped_counted_and_filled(truncated, caplog):
    loader = build_train_loader(cfg_for(truncated), dp_rank=0, dp_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        seen = sum((decode_index(x) for x, _ in loader), [])
    assert len(seen) == loader.steps_per_epoch * 4 == 96  # steps unchanged: the loader fills from the epoch start
    assert set(seen) == set(range(96)) - set(range(50, 65))
    assert loader.stats()["bad_samples"] == 15  # 50 (no image) + 51..64 (missing)
    text = caplog.text
    assert "train-000002.tar" in text and "shard ended after 11 samples, expected 25" in text
    assert "key 's000050'" in text and "no image file" in text


def test_truncated_tar_two_ranks_two_workers_same_steps(truncated):
    cfg = cfg_for(truncated, num_workers=2, shuffle=True)
    total_bad = 0
    for rank in range(2):
        loader = build_train_loader(cfg, dp_rank=rank, dp_size=2, seed=0)
        assert len(list(loader)) == loader.steps_per_epoch == 12
        total_bad += loader.stats()["bad_samples"]
    assert total_bad == 15  # each bad sample once, though the fill-up (overflow) reads some of them again


@pytest.mark.parametrize("workers,ranks", [(2, 1), (2, 2), (0, 1)])
def test_bad_samples_counted_once_per_epoch(truncated, workers, ranks):
    """A worker whose share ran short continues into the epoch sequence and may meet the same bad
    samples again: they were counted by the share that holds them (the count was 22 for 15 before)."""
    cfg = cfg_for(truncated, num_workers=workers, shuffle=True)
    for epochs in (1, 2):
        total = 0
        for rank in range(ranks):
            loader = build_train_loader(cfg, dp_rank=rank, dp_size=ranks, seed=0)
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                list(loader)
            total += loader.stats()["bad_samples"]
        assert total == 15 * epochs  # the run's count: each bad sample once per epoch it is read in


def test_out_of_range_label_without_manifest_is_a_bad_sample(tmp_path, caplog):
    """No dataset.json: the bound comes from the model (num_classes passed in) instead of an IndexError later."""
    rng = np.random.default_rng(0)
    write_raw_tar(tmp_path / "a.tar", {f"k{i:03d}": {"png": encode(synthetic_image(i, 8, 1, rng), "png"),
                                                     "cls": b"%d" % (12 if i == 4 else i % 3)} for i in range(9)})
    cfg = cfg_for(tmp_path, train=f"{tmp_path}/a.tar", val=f"{tmp_path}/a.tar")
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0, num_classes=10)
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        labels = torch.cat([y for _, y in loader])
    assert len(labels) == 8 and int(labels.max()) < 10 and loader.stats()["bad_samples"] == 1
    assert "key 'k004'" in caplog.text and "label 12 is out of range [0, 10) of the model's 10 classes" in caplog.text
    val = build_val_loader(cfg, dp_rank=0, dp_size=1, num_classes=10)
    assert sum(int(v.sum()) for _, _, v in val) == 8 and val.bad_samples == 1
    with pytest.raises(DataError, match=r"key 'k004': label 12 is out of range \[0, 10\)"):
        list(build_train_loader(cfg.model_copy(update={"on_error": "raise"}), dp_rank=0, dp_size=1, seed=0,
                                num_classes=10))


def test_without_manifest_the_normalisation_is_named_in_one_line(tmp_path, caplog):
    rng = np.random.default_rng(0)
    write_raw_tar(tmp_path / "a.tar", {f"k{i}": {"png": encode(synthetic_image(i, 8, 1, rng), "png"), "cls": b"1"}
                                       for i in range(8)})
    cfg = cfg_for(tmp_path, train=f"{tmp_path}/a.tar", val=None, mean=None, std=None)
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)
        build_train_loader(cfg, dp_rank=1, dp_size=2, seed=0)  # said once, by rank 0
    lines = [r.getMessage() for r in caplog.records if "normalising" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "mean [0.449] std [0.226] from ImageNet's defaults" in lines[0] and "data.mean" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        build_train_loader(cfg.model_copy(update={"mean": [0.5], "std": [0.25]}), dp_rank=0, dp_size=1, seed=0)
    assert "mean [0.500] std [0.250] from data.mean/data.std" in caplog.text


def test_shard_deleted_after_listing_is_reported_missing(tmp_path, caplog):
    write_synthetic(tmp_path, shard_sizes=SIZES)
    loader = build_train_loader(cfg_for(tmp_path), dp_rank=0, dp_size=1, seed=0)
    (tmp_path / "train-000002.tar").unlink()  # e.g. removed while the run was going
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        assert len(list(loader)) == loader.steps_per_epoch
    assert "train-000002.tar" in caplog.text and "shard is missing (file not found), 25 samples expected" in caplog.text
    assert "truncated or corrupt" not in caplog.text and loader.stats()["bad_samples"] == 25
    # Listed again (a new run, a glob): the manifest still names it, so it is reported missing, not silently dropped.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        again = build_train_loader(cfg_for(tmp_path), dp_rank=0, dp_size=1, seed=0)
    assert again.num_samples == 96 - 25 and "train-000002.tar: missing (the manifest lists it with 25 samples)" in caplog.text
    with pytest.raises(DataError, match=r"train-000002.tar: missing"):
        build_train_loader(cfg_for(tmp_path, on_error="raise"), dp_rank=0, dp_size=1, seed=0)


def test_truncated_tar_raises_when_asked(truncated):
    loader = build_train_loader(cfg_for(truncated, on_error="raise"), dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(DataError, match=r"bad data in shard '.*train-000002.tar'.*set data.on_error=skip"):
        list(loader)


def records_with(bad: dict[int, tuple[str, bytes]], n: int = 24):
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        rec = Record(f"s{i:06d}", encode(synthetic_image(i, 8, 1, rng), "png"), "png", i % 10, {})
        if i in bad:
            field, value = bad[i]
            setattr(rec, field, value)
        recs.append(rec)
    return recs


@pytest.mark.parametrize("bad,reason", [
    (("image", b"\x89PNG not really"), "cannot decode .png image"),
    (("label", 99), "label 99 is out of range [0, 10)"),
])
def test_bad_sample_is_skipped_with_its_key(tmp_path, caplog, bad, reason):
    write_dataset(tmp_path, {"train": records_with({5: bad})}, name="t", classes=[str(c) for c in range(10)],
                  channels=1, image_size=[8, 8], mean=[0.0], std=[1.0], samples_per_shard=12)
    loader = build_train_loader(cfg_for(tmp_path, val=None), dp_rank=0, dp_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        seen = sum((decode_index(x) for x, _ in loader), [])
    assert 5 not in seen and len(seen) == 24 and seen.count(0) == 2  # the gap is filled from the start
    assert loader.stats()["bad_samples"] == 1
    assert "key 's000005'" in caplog.text and reason in caplog.text and "train-000000.tar" in caplog.text

    raising = build_train_loader(cfg_for(tmp_path, val=None, on_error="raise", num_workers=1), dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(DataError, match=f"key 's000005': {reason[:20]}"):
        list(raising)


def write_raw_tar(path, samples: dict[str, dict[str, bytes]]):
    with TarWriter(str(path), encoder=False) as w:
        for key, files in samples.items():
            w.write({"__key__": key, **files})


@pytest.mark.parametrize("files,reason", [
    ({"png": None}, "missing label (no .cls file)"),
    ({"png": None, "cls": b"seven"}, "label .cls is not an integer: b'seven'"),
    ({"txt": b"hello", "cls": b"1"}, "no image file"),
])
def test_foreign_shard_label_problems(tmp_path, caplog, files, reason):
    rng = np.random.default_rng(0)
    good = {f"k{i:03d}": {"png": encode(synthetic_image(i, 8, 1, rng), "png"), "cls": b"%d" % (i % 3)} for i in range(8)}
    broken = {k: (encode(synthetic_image(99, 8, 1, rng), "png") if v is None else v) for k, v in files.items()}
    write_raw_tar(tmp_path / "a.tar", {**dict(list(good.items())[:3]), "k900": broken, **dict(list(good.items())[3:])})
    loader = build_train_loader(cfg_for(tmp_path, train=f"{tmp_path}/a.tar", val=None), dp_rank=0, dp_size=1, seed=0)
    assert loader.num_samples == 9  # counted from the tar headers (no manifest)
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        batches = list(loader)
    assert len(batches) == 2 and loader.stats()["bad_samples"] == 1
    assert "key 'k900'" in caplog.text and reason in caplog.text


def test_pattern_without_shards_names_the_pattern(tmp_path):
    with pytest.raises(DataError, match=r"shard pattern '.*/nothing-\*\.tar' matches no shard"):
        build_train_loader(cfg_for(tmp_path, train=f"{tmp_path}/nothing-*.tar"), dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(DataError, match=r"names 2 shard\(s\) that do not exist, e.g. '.*/x-000001.tar'"):
        build_train_loader(cfg_for(tmp_path, train=f"{tmp_path}/x-{{000001..000002}}.tar"), dp_rank=0, dp_size=1, seed=0)


def test_not_a_tar_without_manifest(tmp_path, caplog):
    rng = np.random.default_rng(0)
    write_raw_tar(tmp_path / "a.tar", {f"k{i}": {"png": encode(synthetic_image(i, 8, 1, rng), "png"), "cls": b"1"} for i in range(8)})
    (tmp_path / "b.tar").write_bytes(b"this is not a tar file" * 40)
    cfg = cfg_for(tmp_path, train=f"{tmp_path}/*.tar", val=None)
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        loader = build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)
    assert loader.num_samples == 8 and "b.tar' is not a readable tar" in caplog.text
    with pytest.raises(DataError, match=r"shard '.*b.tar' is not a readable tar"):
        build_train_loader(cfg.model_copy(update={"on_error": "raise"}), dp_rank=0, dp_size=1, seed=0)


def test_all_samples_bad_raises_instead_of_spinning(tmp_path):
    write_raw_tar(tmp_path / "a.tar", {f"k{i}": {"png": b"garbage", "cls": b"1"} for i in range(8)})
    loader = build_train_loader(cfg_for(tmp_path, train=f"{tmp_path}/a.tar", val=None), dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(DataError, match=r"samples in a row failed, more than the 8 of the whole epoch"):
        list(loader)


def test_val_bad_sample_becomes_padding(tmp_path):
    recs = records_with({3: ("image", b"junk")}, n=10)
    write_dataset(tmp_path, {"train": recs, "val": recs}, name="t", classes=[str(c) for c in range(10)],
                  channels=1, image_size=[8, 8], mean=[0.0], std=[1.0])
    loader = build_val_loader(cfg_for(tmp_path, num_workers=2), dp_rank=0, dp_size=1)
    seen = sum((decode_index(x[v]) for x, _, v in loader), [])
    assert sorted(seen) == [i for i in range(10) if i != 3]
    assert loader.bad_samples == 1 and len(loader) == 3


def _crash_on(key):
    real = pipeline.decode_crop

    def decode(item, in_chans, *args):
        if item["__key__"] == key:
            os._exit(3)  # a worker dying hard (OOM killer, segfault in a codec)
        return real(item, in_chans, *args)

    return decode


def _hang_on(key):
    real = pipeline.decode_crop

    def decode(item, in_chans, *args):
        if item["__key__"] == key:
            time.sleep(60)
        return real(item, in_chans, *args)

    return decode


@pytest.mark.parametrize("make,match", [(_crash_on, "exited unexpectedly"), (_hang_on, "timed out")])
def test_dead_or_stuck_worker_is_an_error_not_a_hang(tmp_path, monkeypatch, make, match):
    write_synthetic(tmp_path, shard_sizes=[16, 16])
    monkeypatch.setattr(pipeline, "decode_crop", make("s000020"))  # forked workers inherit the patch
    cfg = cfg_for(tmp_path, num_workers=2, worker_timeout_s=3.0, mp_context="fork")
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=match):
        list(loader)
    assert time.monotonic() - start < 30


def test_training_without_manifest_skips_out_of_range_label(tmp_path):
    """End to end: shards from another tool, one label beyond the model's 10 classes. The run used to die
    with IndexError in the loss; now the trainer passes the model's class count to the loader, which skips
    the sample under on_error=skip (counted in metrics.csv), and one line names the normalisation used."""
    from trainer_helpers import launch, read_metrics

    rng = np.random.default_rng(0)
    write_raw_tar(tmp_path / "foreign.tar", {f"k{i:03d}": {"png": encode(synthetic_image(i, 8, 1, rng), "png"),
                                                           "cls": b"%d" % (12 if i == 5 else i % 10)} for i in range(24)})
    sets = [f"run.output_dir={tmp_path}", "run.name=r", "run.max_steps=3", "run.eval_every=1000",
            f"data.train={tmp_path}/foreign.tar", "data.val=null", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle=false", "model.num_classes=10", "log.every_steps=1", "log.tensorboard=false",
            "log.progress=false", "parallel.precision=fp32", "checkpoint.export=false"]
    args = ["--config", "demo_digits"] + [x for s in sets for x in ("--set", s)]
    proc = launch(args, launcher="python", timeout=600)
    assert "label 12 is out of range [0, 10) of the model's 10 classes" in proc.stderr
    assert "normalising" in proc.stderr and "ImageNet's defaults" in proc.stderr
    rows = read_metrics(tmp_path / "r")
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and int(rows[-1]["bad_samples"]) == 1
