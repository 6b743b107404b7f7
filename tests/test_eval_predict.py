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
