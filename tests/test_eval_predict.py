"""`distvit eval` and `distvit predict` (issue 20) on a digits run folder made here in a few seconds:
config.yaml + model.safetensors as the trainer leaves them, weights from 40 plain AdamW steps.

References are computed independently in the test: the top-1/top-5/confusion from the model's
logits over the val loader, predict's probabilities from the raw PNG pixels normalised by hand.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distvit import models
from distvit.config import load_config, save_config
from distvit.evaluate import evaluate
from distvit.evaluate import main as eval_main
from distvit.inference import load_run
from distvit.predict import main as predict_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_dir):
    from distvit.checkpoint.consolidate import save_safetensors
    from distvit.data import build_train_loader

    cfg = load_config("configs/demo_digits.yaml", [f"data.train={digits_dir}/train-*.tar",
                                                   f"data.val={digits_dir}/val-*.tar", "model.num_classes=10"])
    torch.manual_seed(0)
    model = models.create("vit_digits", num_classes=10, img_size=8, in_chans=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = build_train_loader(cfg.data, dp_rank=0, dp_size=1, seed=0)
    loader.set_epoch(0)
    for step, (x, y) in zip(range(40), loader):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("run") / "digits_run"
    out.mkdir()
    save_config(cfg, out / "config.yaml")
    save_safetensors(model.state_dict(), out / "model.safetensors",
                     {"format": "pt", "model": "vit_digits", "config": json.dumps(cfg.model_dump(mode="json"))})
    return out


def _reference(run_dir):
    from distvit.data import build_val_loader

    run = load_run(str(run_dir), "cpu")
    conf = np.zeros((10, 10), dtype=int)
    top5 = 0
    with torch.no_grad():
        for x, y, valid in build_val_loader(run.cfg.data, dp_rank=0, dp_size=1):
            logits = run.model(x)[valid]
            y = y[valid]
            for t, p in zip(y.tolist(), logits.argmax(-1).tolist()):
                conf[t, p] += 1
            top5 += int((logits.topk(5, -1).indices == y[:, None]).any(-1).sum())
    return conf, top5


def test_eval_numbers_match_the_models_own_logits(run_dir, capsys):
    conf, top5 = _reference(run_dir)
    assert conf.sum() == 360  # every val sample once
    assert eval_main(["--checkpoint", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert np.array_equal(np.array(result["confusion"]), conf)
    top1 = 100 * np.trace(conf) / 360
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(100 * top5 / 360)
    assert 15 < top1 < 100  # the 40 steps learned something (chance: 10%), and the matrix is not trivial
    assert result["classes"] == [str(i) for i in range(10)]  # names from the manifest
    assert result["per_class"]["3"] == {"correct": int(conf[3, 3]), "count": int(conf[3].sum()),
                                        "top1": pytest.approx(100 * conf[3, 3] / conf[3].sum())}
    assert f"top-1 {top1:.2f}%" in out and f"confusion matrix: {run_dir / 'eval' / 'confusion.png'}" in out
    # The PNG: 40 px cells after a 40 px margin, each shaded by its share of the row.
    from PIL import Image

    img = Image.open(run_dir / "eval" / "confusion.png").convert("RGB")
    assert img.size == (40 + 10 * 40, 40 + 10 * 40)
    for i, j in [(3, 3), (3, 5), (8, 1)]:
        s = conf[i, j] / conf[i].sum()
        assert img.getpixel((40 + j * 40 + 38, 40 + i * 40 + 38)) == (int(255 - 247 * s), int(255 - 207 * s), int(255 - 148 * s))


def test_eval_on_another_pattern_and_from_the_weights_file(run_dir, digits_dir, tmp_path):
    one_shard = sorted(digits_dir.glob("val-*.tar"))[0]
    run = load_run(str(run_dir / "model.safetensors"), "cpu")  # config from the file's metadata
    result = evaluate(run, str(one_shard), batch_size=7)
    from distvit.data import read_manifest

    assert result["count"] == read_manifest(str(one_shard))["splits"]["val"]["shards"][0]["samples"]
    # A bare weights file without config beside it or in its metadata: one line naming the fix.
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file(run.model.state_dict(), str(bare))
    with pytest.raises(ValueError, match=r"carries no distvit config .* pass the run folder instead"):
        load_run(str(bare))


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert eval_main(["--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such run folder or file" in err


def test_predict_prints_top_k_names_with_the_runs_preprocessing(run_dir, digits_dir, tmp_path, capsys):
    from distvit.data import read_manifest

    manifest = read_manifest(str(digits_dir / "val-*.tar"))
    shard = sorted(digits_dir.glob("val-*.tar"))[0]
    paths, pixels = [], []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".png") and len(paths) < 6:
                data = tar.extractfile(member).read()
                path = tmp_path / member.name.replace("/", "_")
                path.write_bytes(data)
                paths.append(str(path))
                from PIL import Image

                pixels.append(np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32))
    x = (torch.tensor(np.stack(pixels))[:, None] / 255 - manifest["mean"][0]) / manifest["std"][0]
    run = load_run(str(run_dir), "cpu")
    with torch.no_grad():
        probs = run.model(x).softmax(-1)
    assert predict_main(["--checkpoint", str(run_dir), "--top-k", "3", "--device", "cpu", *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(paths) == 6
    for line, path, p in zip(lines, paths, probs):
        v, i = p.topk(3)
        assert line == f"{path}: " + ", ".join(f"{manifest['classes'][c]} ({q:.3f})" for q, c in zip(v.tolist(), i.tolist()))
    assert predict_main(["--checkpoint", str(run_dir), str(tmp_path / "missing.png")]) == 2
    assert "cannot be read" in capsys.readouterr().err


# --- class names that are not indices (issue 20): a tiny imagefolder dataset with class folders cat/ and dog/

PETS = ("cat", "dog")


def write_pets(src, out, n_train: int = 16, n_val: int = 10):
    """1-channel PNGs in src/{train,val}/{cat,dog}/, written as shards (dataset.json: classes cat, dog) by the
    writer behind `distvit data write imagefolder`. Sides are even, 4..12 px, in many aspect ratios; a cat is
    bright on the left, a dog on the right. Returns the val image paths, class by class."""
    from PIL import Image

    from distvit.data.write import write_imagefolder

    rng = np.random.default_rng(0)
    val = []
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(PETS):
            (src / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = 4 + 2 * ((3 * i + c) % 5), 4 + 2 * ((2 * i + 3 * c) % 5)
                x = rng.integers(0, 90, (h, w))
                x[:, : w // 2] += 160 if name == "cat" else 0
                x[:, w // 2:] += 160 if name == "dog" else 0
                path = src / split / name / f"{i:03d}.png"
                Image.fromarray(x.astype(np.uint8), "L").save(path)
                if split == "val":
                    val.append(path)
    write_imagefolder(src, out)
    return val


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    return root / "shards", write_pets(root / "src", root / "shards")


def _square_run(out, shards, num_classes: int, **sets):
    """A run folder (config.yaml + model.safetensors) of an untrained vit_digits with `num_classes` outputs on `shards`."""
    from distvit.checkpoint.consolidate import save_safetensors

    cfg = load_config("configs/demo_digits.yaml", [f"data.train={shards}/train-*.tar", f"data.val={shards}/val-*.tar",
                                                   f"model.num_classes={num_classes}", *[f"{k}={v}" for k, v in sets.items()]])
    torch.manual_seed(num_classes)
    model = models.create("vit_digits", num_classes=num_classes, img_size=8, in_chans=1)
    out.mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    save_safetensors(model.state_dict(), out / "model.safetensors", {"format": "pt", "model": "vit_digits"})
    return out


def _predicted_indices(run_dir, paths, k):
    from PIL import Image

    run = load_run(str(run_dir), "cpu")
    with torch.no_grad():
        logits = run.logits(run.preprocess([Image.open(p) for p in paths]))
    return logits.softmax(-1).topk(k, -1).indices.tolist()


def test_predict_and_eval_name_non_numeric_classes_from_the_manifest(pets, tmp_path, capsys):
    shards, val = pets
    run_dir = _square_run(tmp_path / "pets_run", shards, 2)
    paths = [str(p) for p in val[::3]]
    assert predict_main(["--checkpoint", str(run_dir), "--top-k", "2", "--device", "cpu", *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(paths)
    for line, path, top in zip(lines, paths, _predicted_indices(run_dir, paths, 2)):
        names = [part.split(" (")[0] for part in line[len(f"{path}: "):].split(", ")]
        assert names == [PETS[i] for i in top], line  # index i printed as the manifest's i-th class name
    result = evaluate(load_run(str(run_dir), "cpu"))
    assert result["classes"] == list(PETS) and set(result["per_class"]) == set(PETS)
    assert result["count"] == len(val) == sum(c["count"] for c in result["per_class"].values())


def test_predict_falls_back_to_indices_when_names_are_missing_or_do_not_fit(pets, tmp_path, capsys):
    shards, val = pets
    paths = [str(p) for p in val[:4]]
    # The dataset moved: the run's config names shards that are gone, so there is no manifest to name from.
    moved = _square_run(tmp_path / "moved", tmp_path / "gone", 2)
    assert predict_main(["--checkpoint", str(moved), "--top-k", "2", "--device", "cpu", *paths]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    for line, path, top in zip(out, paths, _predicted_indices(moved, paths, 2)):
        assert [part.split(" (")[0] for part in line[len(f"{path}: "):].split(", ")] == [str(i) for i in top]
    # A manifest with 2 names for a 3-class head: the names cannot be the head's, indices instead.
    three = _square_run(tmp_path / "three", shards, 3)
    assert load_run(str(three), "cpu").classes == ["0", "1", "2"]
    assert predict_main(["--checkpoint", str(three), "--top-k", "3", "--device", "cpu", paths[0]]) == 0
    names = [part.split(" (")[0] for part in capsys.readouterr().out.strip()[len(f"{paths[0]}: "):].split(", ")]
    assert sorted(names) == ["0", "1", "2"]
    # eval of the moved run on shards given with --data names the classes from those shards' manifest.
    assert evaluate(load_run(str(moved), "cpu", data=f"{shards}/val-*.tar"), f"{shards}/val-*.tar")["classes"] == list(PETS)
