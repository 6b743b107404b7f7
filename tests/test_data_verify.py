"""`distvit data verify` and `data write` checks: shards without a manifest, sample layout, sizes, one-line errors."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distvit.data import read_manifest
from distvit.data.cli import main as data_main
from distvit.data.verify import verify


def plain_files(folder, n=36, size=5):
    """n samples as key.png + key.cls files, as a user would have them before making tars."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"s{i:03d}.png")
        (folder / f"s{i:03d}.cls").write_text(f"{i % 3}\n")
    return folder


@pytest.fixture()
def foreign(tmp_path):
    """Two tars with each sample's files adjacent (names in sorted order), no dataset.json."""
    files = plain_files(tmp_path / "files", n=12)
    names = sorted(p.name for p in files.iterdir())
    for s in range(2):
        subprocess.run(["tar", "-cf", str(tmp_path / f"f-{s}.tar"), *names[s * 12:(s + 1) * 12]],
                       cwd=files, check=True)
    return tmp_path


def test_verify_without_manifest_under_a_progress_bar(foreign, monkeypatch, capsys):
    """tqdm with total=None has no truth value; verify used `if bar:` and crashed with a TypeError."""
    import tqdm

    real = tqdm.tqdm
    made = []

    def forced(*a, **k):  # progress bars are on even though stderr is not a terminal here
        k["disable"] = False
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(tqdm, "tqdm", forced)
    report = verify(f"{foreign}/f-*.tar", in_chans=1, batch_size=4, progress=True)
    assert made and made[0].total is None and made[0].n == 12
    assert report.total == 12 and report.good == 12 and report.problems == []
    assert data_main(["verify", f"{foreign}/f-*.tar", "--in-chans", "1", "--batch-size", "4", "--strict"]) == 0
    assert data_main(["verify", f"{foreign}/f-*.tar", "--in-chans", "1", "--batch-size", "4", "--strict",
                      "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("12 good, 0 bad") == 2 and "manifest: none" in out


def test_tar_recipe_with_files_apart_is_named_and_no_empty_manifest(tmp_path, capsys):
    """`tar cf x.tar *.png *.cls` stores all images, then all labels: verify says so and how to fix it,
    and refuses to write a manifest with no classes (it used to write `classes: []` and exit 0)."""
    files = plain_files(tmp_path / "files", n=36)
    pngs = sorted(p.name for p in files.glob("*.png"))
    clss = sorted(p.name for p in files.glob("*.cls"))
    subprocess.run(["tar", "cf", str(tmp_path / "x.tar"), *pngs, *clss], cwd=files, check=True)
    code = data_main(["verify", str(tmp_path / "x.tar"), "--no-progress", "--in-chans", "1",
                      "--write-manifest", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and read_manifest(str(tmp_path / "x.tar")) is None
    assert "0 good, 72 bad" in captured.out
    assert "files of 36 sample(s) are not adjacent" in captured.out and "LC_ALL=C sort | tar" in captured.out
    assert "distvit data write" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "no manifest written" in err[0] and "no classes" in err[0]

    # Training on it says the same at start instead of failing every sample.
    from distvit.data.config import DataConfig
    from distvit.data.errors import DataError
    from distvit.data.loader import build_train_loader

    cfg = DataConfig(train=str(tmp_path / "x.tar"), val=None, on_error="raise", num_workers=0, batch_size=4)
    with pytest.raises(DataError, match=r"x.tar': the files of a sample are not adjacent .*LC_ALL=C sort \| tar"):
        build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)

    # The fixed recipe from docs/data.md gives 36 good samples and a manifest.
    subprocess.run(["tar", "-cf", str(tmp_path / "y.tar"), *sorted(pngs + clss)], cwd=files, check=True)
    assert data_main(["verify", str(tmp_path / "y.tar"), "--no-progress", "--in-chans", "1", "--batch-size", "8",
                      "--strict", "--write-manifest", str(tmp_path / "m")]) == 0
    assert "36 good, 0 bad" in capsys.readouterr().out
    assert read_manifest(str(tmp_path / "m" / "dataset.json"))["num_classes"] == 3


def test_docs_tar_recipe_keeps_samples_together(tmp_path, capsys):
    """The recipe docs/data.md gives, run as written, makes shards whose samples all verify."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text().splitlines()
    recipe = [line.split("    #")[0].strip() for line in docs if line.lstrip().startswith("ls *.png *.cls")]
    assert len(recipe) == 1, recipe
    files = plain_files(tmp_path, n=36)
    subprocess.run(recipe[0], shell=True, cwd=files, check=True)
    assert data_main(["verify", str(tmp_path / "x.tar"), "--no-progress", "--in-chans", "1", "--batch-size", "8",
                      "--strict"]) == 0
    assert "36 good, 0 bad" in capsys.readouterr().out


def test_strict_fails_when_the_data_cannot_fill_one_global_batch(foreign, capsys):
    args = ["verify", f"{foreign}/f-*.tar", "--in-chans", "1", "--no-progress", "--world", "2", "--batch-size", "8"]
    assert data_main(args) == 0  # reported, not fatal without --strict
    assert data_main(args + ["--strict"]) == 1
    out = capsys.readouterr().out
    assert "12 samples cannot fill one global batch of 2 rank(s) x batch 8 = 16" in out


def test_deleted_shard_is_missing_not_corrupt(foreign, capsys):
    """With a manifest, a shard deleted afterwards is reported as missing (verify, and the loader)."""
    assert data_main(["verify", f"{foreign}/f-*.tar", "--in-chans", "1", "--no-progress",
                      "--write-manifest", str(foreign)]) == 0
    (foreign / "f-1.tar").unlink()
    assert data_main(["verify", f"{foreign}/f-*.tar", "--in-chans", "1", "--no-progress", "--strict", "--json"]) == 1
    problems = json.loads(capsys.readouterr().out.splitlines()[-1])["problems"]
    assert any("f-1.tar: missing (the manifest lists it with 6 samples)" in p for p in problems)
    assert not any("corrupt" in p or "truncated" in p for p in problems)


def test_samples_per_shard_zero_is_refused(tmp_path, capsys):
    plain_files(tmp_path / "src" / "a", n=2)
    assert data_main(["write", "imagefolder", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                      "--samples-per-shard", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--samples-per-shard must be >= 1, got 0" in err[0]
    assert not (tmp_path / "out" / "dataset.json").exists()
