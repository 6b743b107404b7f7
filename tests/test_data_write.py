"""Writers (digits, imagefolder, csv), foreign shards, the manifest, and `distvit data write|verify`."""
from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from distvit.data import read_manifest, write_csv, write_digits, write_imagefolder
from distvit.data.cli import main as data_main
from distvit.data.config import DataConfig
from distvit.data.errors import DataError
from distvit.data.loader import build_train_loader, build_val_loader


def identity_cfg(root, in_chans, size, **kw) -> DataConfig:
    return DataConfig(train=f"{root}/train-*.tar", val=f"{root}/val-*.tar", batch_size=2, num_workers=0,
                      img_size=size, in_chans=in_chans, mean=[0.0] * in_chans, std=[1.0] * in_chans,
                      train_crop_scale=[1.0, 1.0], train_crop_ratio=[1.0, 1.0], shuffle=False, **kw)


def test_digits_writer_manifest_and_reproducible_bytes(tmp_path):
    path = write_digits(tmp_path / "a", samples_per_shard=400)
    m = read_manifest(str(tmp_path / "a" / "train-*.tar"))
    assert m == json.loads(path.read_text())
    assert m["samples"] == {"train": 1437, "val": 360} and m["num_classes"] == 10 and m["image_size"] == [8, 8]
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [400, 400, 400, 237]
    for s in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
        data = (tmp_path / "a" / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    # The same input gives the same bytes (fixed mtime, sorted members): shards can be checked by hash.
    write_digits(tmp_path / "b", samples_per_shard=400)
    assert json.loads((tmp_path / "b" / "dataset.json").read_text())["splits"] == m["splits"]
    # Statistics are those of the training pixels in [0, 1].
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, _ = train_test_split(np.arange(len(d.images)), test_size=0.2, random_state=0, stratify=d.target)
    px = np.round(d.images[tr] * 255 / 16) / 255
    assert m["mean"][0] == pytest.approx(px.mean(), abs=1e-6) and m["std"][0] == pytest.approx(px.std(), abs=1e-6)


def test_existing_output_refused_then_overwritten(tmp_path):
    write_digits(tmp_path, samples_per_shard=1000)
    with pytest.raises(DataError, match=r"already holds dataset.json, train-000000.tar.*pass --overwrite"):
        write_digits(tmp_path)
    write_digits(tmp_path, samples_per_shard=2000, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]


def test_interrupted_write_leaves_no_manifest(tmp_path, monkeypatch):
    write_digits(tmp_path)
    from distvit.data import write

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        write_digits(tmp_path, overwrite=True)
    assert read_manifest(str(tmp_path)) is None  # the old manifest went first; the new one never came


def make_folder(root, rgb=True):
    """root/<class>/<n>.png|jpg with random pixels; returns {relative path: (pixels, label)}."""
    rng = np.random.default_rng(0)
    truth = {}
    for label, cls in enumerate(["cat", "dog", "eel"]):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            shape = (6, 6, 3) if rgb else (6, 6)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            ext = "jpg" if i == 3 else "png"
            path = root / cls / f"img.{i}.{ext}"  # a dot in the stem must not split the webdataset key
            Image.fromarray(arr).save(path)
            pixels = np.asarray(Image.open(path).convert("RGB" if rgb else "L"))  # JPEG: the decoded pixels
            truth[f"{cls}/img.{i}.{ext}"] = (pixels, label)
    return truth


def loaded_pixels(loader, with_valid):
    out = []
    for batch in loader:
        images, labels = batch[0], batch[1]
        keep = batch[2] if with_valid else torch.ones(len(labels), dtype=torch.bool)
        for img, y in zip(images[keep], labels[keep]):
            out.append(((img * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy(), int(y)))
    return out


def as_multiset(pairs):
    return sorted((p.tobytes(), y) for p, y in pairs)


def test_imagefolder_to_shards_to_loader_same_pixels_and_labels(tmp_path):
    truth = make_folder(tmp_path / "src")
    write_imagefolder(tmp_path / "src", tmp_path / "out", val_fraction=0.25, samples_per_shard=5)
    m = read_manifest(str(tmp_path / "out"))
    assert m["classes"] == ["cat", "dog", "eel"] and m["samples"] == {"train": 9, "val": 3}
    assert m["image_size"] == [6, 6] and m["channels"] == 3
    cfg = identity_cfg(tmp_path / "out", 3, 6, drop_last=False)
    got = loaded_pixels(build_val_loader(cfg, dp_rank=0, dp_size=1), True)
    train = build_train_loader(cfg.model_copy(update={"batch_size": 3}), dp_rank=0, dp_size=1, seed=0)
    got += loaded_pixels(train, False)
    assert as_multiset(got) == as_multiset(truth.values())


def test_imagefolder_with_train_val_folders_and_csv(tmp_path):
    truth = make_folder(tmp_path / "src" / "train", rgb=False)
    make_folder(tmp_path / "src" / "val", rgb=False)
    write_imagefolder(tmp_path / "src", tmp_path / "out", samples_per_shard=100)
    m = read_manifest(str(tmp_path / "out"))
    assert m["samples"] == {"train": 12, "val": 12} and m["channels"] == 1

    rows = ["path,label,split"] + [f"src/train/{k},{k.split('/')[0]},{'val' if k.endswith('jpg') else 'train'}" for k in truth]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    write_csv(tmp_path / "list.csv", tmp_path / "csv_out")
    m = read_manifest(str(tmp_path / "csv_out"))
    assert m["classes"] == ["cat", "dog", "eel"] and m["samples"] == {"train": 9, "val": 3}
    got = loaded_pixels(build_val_loader(identity_cfg(tmp_path / "csv_out", 1, 6), dp_rank=0, dp_size=1), True)
    assert as_multiset(got) == as_multiset(v for k, v in truth.items() if k.endswith("jpg"))


def test_csv_errors_name_the_line(tmp_path):
    (tmp_path / "a.csv").write_text("x.png,1\nmissing.png,2\n")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"a.csv:2: image '.*missing.png' does not exist"):
        write_csv(tmp_path / "a.csv", tmp_path / "out")


def test_plain_tar_shards_load(tmp_path):
    """Shards made with `tar` from key.png + key.cls files (no manifest) load, counted from headers."""
    rng = np.random.default_rng(1)
    files = tmp_path / "files"
    files.mkdir()
    truth = []
    for i in range(10):
        arr = rng.integers(0, 256, (5, 5), dtype=np.uint8)
        Image.fromarray(arr).save(files / f"sample{i:03d}.png")
        (files / f"sample{i:03d}.cls").write_text(f"{i % 4}\n")
        truth.append((arr, i % 4))
    names = sorted(p.name for p in files.iterdir())
    subprocess.run(["tar", "cf", str(tmp_path / "plain-0.tar"), *names[:10]], cwd=files, check=True)
    subprocess.run(["tar", "cf", str(tmp_path / "plain-1.tar"), *names[10:]], cwd=files, check=True)
    cfg = identity_cfg(tmp_path, 1, 5).model_copy(update={"train": f"{tmp_path}/plain-{{0..1}}.tar",
                                                          "val": f"{tmp_path}/plain-{{0..1}}.tar"})
    train = build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)
    assert train.num_samples == 10 and train.steps_per_epoch == 5
    assert as_multiset(loaded_pixels(train, False)) == as_multiset(truth)
    assert as_multiset(loaded_pixels(build_val_loader(cfg, dp_rank=0, dp_size=1), True)) == as_multiset(truth)


def test_cli_write_and_verify(tmp_path, capsys):
    assert data_main(["write", "digits", "--out", str(tmp_path), "--samples-per-shard", "600", "--no-progress"]) == 0
    assert "train: 1437 samples in 3 shard(s)" in capsys.readouterr().out
    assert data_main(["write", "digits", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err

    args = ["verify", f"{tmp_path}/train-*.tar", "--world", "2", "--workers", "2", "--batch-size", "32",
            "--in-chans", "1", "--no-progress", "--strict", "--json"]
    assert data_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 1437 and report["bad"] == 0 and report["problems"] == []
    assert sum(report["classes"].values()) == 1437 and len(report["classes"]) == 10
    assert report["split"]["steps_per_epoch"] == 22 and report["split"]["samples_per_rank_worker"] == [[352, 352]] * 2

    # Corrupt one image in place (same size, so the tar stays readable): the verifier names it.
    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"\x89PNG", 512 * 10)
    data[at:at + 16] = b"\x00" * 16
    shard.write_bytes(bytes(data))
    assert data_main(args) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["bad"] == 1
    assert any("train-000001.tar key 'train_" in p and "cannot decode .png" in p for p in report["problems"])
    assert any("train-000001.tar: sha256" in p for p in report["problems"])
    assert data_main(args[:-2] + ["--json"]) == 0  # without --strict: reported, exit 0
    capsys.readouterr()


def test_verify_writes_a_manifest_for_foreign_shards(tmp_path, capsys):
    from webdataset import TarWriter

    rng = np.random.default_rng(0)
    for s in range(2):
        with TarWriter(str(tmp_path / f"f-{s}.tar"), encoder=False) as w:
            for i in range(7):
                buf = __import__("io").BytesIO()
                Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buf, format="PNG")
                w.write({"__key__": f"k{s}{i}", "png": buf.getvalue(), "cls": b"%d" % (i % 3)})
    assert data_main(["verify", f"{tmp_path}/f-{{0..1}}.tar", "--no-progress", "--write-manifest", str(tmp_path)]) == 0
    m = read_manifest(str(tmp_path / "f-0.tar"))
    assert m["samples"] == {"train": 14} and m["num_classes"] == 3 and m["channels"] == 3 and m["image_size"] == [4, 4]
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [7, 7]
    capsys.readouterr()


def test_cli_help_lists_sources(capsys):
    with pytest.raises(SystemExit):
        data_main(["write", "--help"])
    out = capsys.readouterr().out
    assert "digits" in out and "imagefolder" in out and "csv" in out


def test_pipe_urls_with_manifest(tmp_path):
    write_digits(tmp_path, samples_per_shard=1000)
    pattern = f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar"
    cfg = DataConfig(train=pattern, val=f"pipe:cat {tmp_path}/val-000000.tar", manifest=str(tmp_path / "dataset.json"),
                     num_workers=0, batch_size=100, allow_pipe=True)
    train = build_train_loader(cfg, dp_rank=1, dp_size=2, seed=0)
    assert train.num_samples == 1437 and len(list(train)) == train.steps_per_epoch == 7
    val = build_val_loader(cfg, dp_rank=0, dp_size=1)
    assert sum(int(v.sum()) for _, _, v in val) == 360
    with pytest.raises(DataError, match=r"no sample count for shard 'pipe:cat .*train-000000.tar'.*set data.manifest"):
        build_train_loader(cfg.model_copy(update={"manifest": None}), dp_rank=0, dp_size=1, seed=0)


def test_pipe_urls_need_an_explicit_opt_in(tmp_path, capsys):
    """pipe:CMD runs CMD in a shell: without data.allow_pipe (or --allow-pipe) nothing runs and one line says so."""
    write_digits(tmp_path, samples_per_shard=1000)
    marker = tmp_path / "ran"
    pattern = f"pipe:touch {marker} && cat {tmp_path}/train-000000.tar"
    cfg = DataConfig(train=pattern, val=None, manifest=str(tmp_path / "dataset.json"), num_workers=0, batch_size=100)
    with pytest.raises(DataError, match=r"data.train 'pipe:touch .*' holds a pipe: URL .*runs a shell command; "
                                        r"allow it with data.allow_pipe=true"):
        build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(DataError, match=r"data.val 'pipe:.*allow it with data.allow_pipe=true"):
        build_val_loader(cfg.model_copy(update={"val": pattern}), dp_rank=0, dp_size=1)
    assert data_main(["verify", pattern, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "runs a shell command; allow it with --allow-pipe" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    assert data_main(["verify", pattern, "--no-progress", "--allow-pipe", "--in-chans", "1",
                      "--manifest", str(tmp_path / "dataset.json"), "--json"]) == 0
    assert marker.exists() and json.loads(capsys.readouterr().out)["good"] == 1000


def test_parallel_writer_same_bytes_as_sequential_and_shardwriter(tmp_path):
    """Shards planned up front and written by 3 processes are byte-identical to 1 process, and to
    webdataset's ShardWriter fed the same samples (its byte limit included: --shard-size)."""
    make_folder(tmp_path / "src" / "train")
    make_folder(tmp_path / "src" / "val")
    sums = {}
    for workers in (1, 3):
        write_imagefolder(tmp_path / "src", tmp_path / f"w{workers}", workers=workers, samples_per_shard=5,
                          shard_bytes=600)
        sums[workers] = json.loads((tmp_path / f"w{workers}" / "dataset.json").read_text())
    assert sums[1]["splits"] == sums[3]["splits"] and sums[1]["mean"] == sums[3]["mean"]
    counts = [s["samples"] for s in sums[1]["splits"]["train"]["shards"]]
    assert len(counts) > 12 // 5 + 1  # the byte limit cut some shards before 5 samples

    from distvit.data.write import Record, write_split

    files = sorted((tmp_path / "src" / "train").rglob("*.*"))
    label = {c: i for i, c in enumerate(["cat", "dog", "eel"])}
    recs = [Record(f"train_{i:08d}", p.read_bytes(), "jpg" if p.suffix == ".jpg" else "png", label[p.parent.name],
                   {"path": str(p.relative_to(tmp_path / "src"))}) for i, p in enumerate(files)]
    (tmp_path / "ref").mkdir()
    ref = write_split(recs, tmp_path / "ref", "train", samples_per_shard=5, shard_bytes=600)
    assert ref["shards"] == sums[1]["splits"]["train"]["shards"]


def test_writer_says_when_it_makes_the_val_split(tmp_path, caplog, capsys):
    import logging

    make_folder(tmp_path / "flat")
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        write_imagefolder(tmp_path / "flat", tmp_path / "a", val_fraction=0.25)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no val split in" in lines[0] and "took 3 of 12 images (--val-fraction 0.25" in lines[0]
    assert "/flat/train/<class>/ and " in lines[0] and "/flat/val/<class>/" in lines[0]
    # train/ alone: its subfolders are the classes (not one class called "train"), val is taken from it, said once.
    make_folder(tmp_path / "only" / "train")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        write_imagefolder(tmp_path / "only", tmp_path / "b")
    m = read_manifest(str(tmp_path / "b"))
    assert m["classes"] == ["cat", "dog", "eel"] and m["samples"] == {"train": 11, "val": 1}
    assert len(caplog.records) == 1 and "took 1 of 12 images" in caplog.text
    # With val/ there is nothing to say.
    make_folder(tmp_path / "only" / "val")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        write_imagefolder(tmp_path / "only", tmp_path / "c")
    assert caplog.records == []
    # The CSV without a split column says the same, naming the column to add.
    rows = [f"flat/{p.relative_to(tmp_path / 'flat')},{p.parent.name}" for p in sorted((tmp_path / "flat").rglob("*.*"))]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distvit.data"):
        write_csv(tmp_path / "l.csv", tmp_path / "d")
    assert len(caplog.records) == 1 and "add a third column train|val" in caplog.text


def test_readme_imagenet_recipe_writes_what_the_config_reads(tmp_path, capsys):
    """The README's ImageNet writer command, run on a tiny train/ + val/ tree, makes shards that
    configs/vit_base_patch16_imagenet.yaml finds (with its paths moved under tmp_path)."""
    import shlex
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    line = next(ln for ln in (repo / "README.md").read_text().splitlines()
                if ln.startswith("distvit data write imagefolder") and "imagenet" in ln)
    argv = shlex.split(line.split("#")[0])[2:]  # drop "distvit data"
    src, out = argv[2], argv[argv.index("--out") + 1]
    data = yaml.safe_load((repo / "configs" / "vit_base_patch16_imagenet.yaml").read_text())["data"]
    make_folder(tmp_path / src.lstrip("/") / "train")
    make_folder(tmp_path / src.lstrip("/") / "val")
    argv = [str(tmp_path / a.lstrip("/")) if a in (src, out) else a for a in argv] + ["--no-progress"]
    assert data_main(argv) == 0
    capsys.readouterr()
    cfg = DataConfig(train=str(tmp_path / data["train"].lstrip("/")), val=str(tmp_path / data["val"].lstrip("/")),
                     batch_size=2, num_workers=0, img_size=6, in_chans=3)
    assert build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0).num_samples == 12
    assert build_val_loader(cfg, dp_rank=0, dp_size=1).num_samples == 12
    assert read_manifest(cfg.train)["classes"] == ["cat", "dog", "eel"]
