"""Evaluating runs trained with data.packing (native resolution, issue 17).

- `distvit eval` on a packed digits run: the run's own packed val loader, numbers equal to the model
  applied to each val image alone (`model(img[None])`, pixels decoded and normalised by hand);
- `distvit predict` on a packed run feeds each image at its native-resolution size (aspect kept,
  sides bounded by data.packing.min_side/max_side), not the square eval crop;
- the Trainer's packed eval function (engine/evaluation.py over the packed val loader, on 1 and 2 dp
  ranks) and, end to end, the val loss/top-1/top-5 the Trainer logs for a 2-rank packed run, equal
  a per-image evaluation of the exported weights on images of many sizes; `distvit eval` of that
  run's folder and of its ZeRO-2 checkpoint folder (consolidated in memory) agree with it.

Tolerance (float32): logits agree to ~1e-6 (the packed row's block-diagonal attention sums in another
order than one image alone), so losses are compared with rtol 1e-5, atol 1e-6; top-1/top-5 counts
exactly, except that an image whose top-2 (top-5/6) logit margin is under 1e-4 may be counted either
way (one of the 360 digits in the eval test, when written; the allowance keeps a near-tie from
making the test flaky).
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distvit import models
from distvit.config import load_config, save_config
from distvit.evaluate import main as eval_main
from distvit.inference import load_run
from distvit.predict import main as predict_main
from distvit.predict import predict
from test_eval_predict import PETS, write_pets

PACKING = ["data.packing.max_tokens=64", "data.packing.min_side=4", "data.packing.max_side=8"]
MARGIN = 1e-4


def _save_run(out, cfg, model):
    from distvit.checkpoint.consolidate import save_safetensors

    out.mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    save_safetensors(model.state_dict(), out / "model.safetensors",
                     {"format": "pt", "model": cfg.model.name, "config": json.dumps(cfg.model_dump(mode="json"))})
    return out


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, digits_dir):
    """A packed digits run folder as the trainer leaves it: 40 plain AdamW steps on packed batches (32 images each)."""
    from distvit.data import build_train_loader

    cfg = load_config("configs/demo_digits.yaml", [f"data.train={digits_dir}/train-*.tar", f"data.val={digits_dir}/val-*.tar",
                                                   "model.num_classes=10", "data.batch_size=8", *PACKING])
    torch.manual_seed(0)
    model = models.create("vit_digits", num_classes=10, img_size=8, in_chans=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = build_train_loader(cfg.data, dp_rank=0, dp_size=1, seed=0, patch_size=2)
    loader.set_epoch(0)
    for _, (packed, y) in zip(range(40), loader):
        F.cross_entropy(model(packed), y).backward()
        opt.step()
        opt.zero_grad()
    return _save_run(tmp_path_factory.mktemp("packed") / "run", cfg, model)


def _per_image(model, images, labels, k: int = 5) -> dict:
    """Each image alone through `model` (a dynamic-size ViT): mean loss, top-1/top-k hits, near-ties, top-1 classes."""
    loss, top1, topk, ties, preds = 0.0, 0, 0, 0, []
    with torch.no_grad():
        for x, y in zip(images, labels):
            logits = model(x[None])[0]
            loss += float(F.cross_entropy(logits[None], torch.tensor([y])))
            order = logits.sort(descending=True)
            preds.append(int(order.indices[0]))
            top1 += int(order.indices[0] == y)
            topk += int(y in order.indices[:k].tolist())
            v = order.values
            ties += int(v[0] - v[1] < MARGIN) + int(1 < k < len(v) and v[k - 1] - v[k] < MARGIN)
    return {"count": len(labels), "loss": loss / len(labels), "top1": top1, "topk": topk, "ties": ties, "preds": preds}


def _dynamic(run_dir, num_classes):
    """The run's exported weights in a ViT that takes any image size (per-image reference)."""
    from safetensors.torch import load_file

    model = models.create("vit_digits", num_classes=num_classes, img_size=8, in_chans=1, dynamic_img_size=True)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return model.eval()


def _shard_images(pattern_dir, split, manifest):
    """Every (image, label) of the split's shards, decoded (1 channel) and normalised by the manifest's stats."""
    images, labels = [], []
    for shard in sorted(pattern_dir.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                png = np.asarray(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("L"), np.float32)
                images.append((torch.from_numpy(png)[None] / 255 - manifest["mean"][0]) / manifest["std"][0])
                labels.append(int(tar.extractfile(members[name[:-4] + ".cls"]).read()))
    return images, labels


def test_eval_on_a_packed_run_equals_each_image_alone(packed_run, digits_dir, capsys):
    from distvit.data import read_manifest

    images, labels = _shard_images(digits_dir, "val", read_manifest(str(digits_dir / "val-*.tar")))
    ref = _per_image(_dynamic(packed_run, 10), images, labels)
    assert eval_main(["--checkpoint", str(packed_run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = json.loads((packed_run / "eval" / "eval.json").read_text())
    assert result["count"] == ref["count"] == 360  # every val image once
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (labels, ref["preds"]), 1)
    assert np.abs(np.array(result["confusion"]) - confusion).sum() <= 2 * ref["ties"]
    assert abs(result["top1"] * 360 / 100 - ref["top1"]) <= ref["ties"]
    assert abs(result["top5"] * 360 / 100 - ref["topk"]) <= ref["ties"]
    assert 15 < result["top1"] < 100  # 40 steps learned something; the matrix is not trivial
    assert "top-1" in out and result["classes"] == [str(i) for i in range(10)]


def test_predict_on_a_packed_run_takes_each_image_at_its_native_size(packed_run, tmp_path, capsys):
    # Sizes (h, w) and the sizes data.packing (min_side 4, max_side 8, 2 px patches, native) gives them:
    # the longer side down to 8, or the shorter up to 4 unless the longer side forbids it; patch multiples.
    sizes = {(8, 8): (8, 8), (12, 6): (8, 4), (5, 9): (4, 8), (16, 16): (8, 8), (3, 20): (2, 8), (6, 4): (6, 4)}
    run = load_run(str(packed_run), "cpu")
    manifest = run.manifest  # the digits' dataset.json (data.mean/std are not set)
    rng = np.random.default_rng(1)
    paths, refs = [], []
    model = _dynamic(packed_run, 10)
    for k, ((h, w), (th, tw)) in enumerate(sizes.items()):
        img = Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8), "L")
        paths.append(str(tmp_path / f"img{k}.png"))
        img.save(paths[-1])
        resized = np.asarray(img.resize((tw, th), Image.BILINEAR) if (h, w) != (th, tw) else img, np.float32)
        x = (torch.from_numpy(resized)[None] / 255 - manifest["mean"][0]) / manifest["std"][0]
        with torch.no_grad():
            refs.append(model(x[None])[0].softmax(-1))
    got = predict(run, paths, top_k=3)
    for top, ref in zip(got, refs):
        v, i = ref.topk(3)
        assert [name for name, _ in top] == [str(c) for c in i.tolist()]
        torch.testing.assert_close(torch.tensor([p for _, p in top]), v, rtol=1e-5, atol=1e-6)
    assert predict_main(["--checkpoint", str(packed_run), "--top-k", "1", "--device", "cpu", *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == [top[0][0] for top in got]


# --- the Trainer's packed eval is exact, on images of many sizes

@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    val = write_pets(root / "src", root / "shards")
    from distvit.data import read_manifest

    manifest = read_manifest(str(root / "shards" / "val-*.tar"))
    assert manifest["classes"] == list(PETS)
    images = [(torch.from_numpy(np.asarray(Image.open(p), np.float32))[None] / 255 - manifest["mean"][0])
              / manifest["std"][0] for p in val]
    labels = [PETS.index(p.parent.name) for p in val]
    assert len({tuple(x.shape) for x in images}) >= 6  # many sizes: several images of each size share a row
    return root / "shards", images, labels


PETS_PACKING = ["data.packing.max_tokens=64", "data.packing.min_side=4", "data.packing.max_side=12"]  # sizes kept


def test_the_packed_eval_function_equals_each_image_alone_on_one_and_two_ranks(pets):
    from distvit.data import build_val_loader
    from distvit.data.config import DataConfig
    from distvit.engine.evaluation import evaluate_classifier

    shards, images, labels = pets
    torch.manual_seed(3)
    model = models.create("vit_digits", num_classes=2, img_size=8, in_chans=1, dynamic_img_size=True).eval()
    ref = _per_image(model, images, labels, k=1)
    cfg = DataConfig(train=f"{shards}/train-*.tar", val=f"{shards}/val-*.tar", batch_size=2, num_workers=0,
                     img_size=8, in_chans=1, packing={"max_tokens": 64, "min_side": 4, "max_side": 12})
    for dp in (1, 2):
        parts = [evaluate_classifier(model, model, build_val_loader(cfg, dp_rank=r, dp_size=dp, patch_size=2),
                                     device=torch.device("cpu"), dtype=torch.float32, dp_group=None) for r in range(dp)]
        count = sum(p["val_count"] for p in parts)  # no process group: each rank's own totals, summed here
        assert count == ref["count"]
        if dp == 2:
            assert len({p["val_count"] for p in parts}) == 2, parts  # unequal image counts: the weighting matters
        loss = sum(p["val_loss"] * p["val_count"] for p in parts) / count
        top1 = sum(p["val_top1"] * p["val_count"] for p in parts) / 100
        assert loss == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        assert abs(top1 - ref["top1"]) <= ref["ties"] + 1e-9


@pytest.mark.slow
@pytest.mark.multirank
def test_trainer_packed_eval_equals_each_image_alone_and_eval_of_its_checkpoint(pets, tmp_path, capsys):
    from distvit.checkpoint import io as ckio
    from trainer_helpers import launch, read_metrics

    shards, images, labels = pets
    steps = 4
    sets = [f"run.output_dir={tmp_path}", "run.name=pets", f"run.max_steps={steps}", "run.eval_every=1000",
            f"data.train={shards}/train-*.tar", f"data.val={shards}/val-*.tar", "data.batch_size=2",
            "data.num_workers=0", "log.every_steps=1", "log.tensorboard=false", "log.progress=false",
            "schedule.warmup_steps=1", "optim.lr=3e-3", "parallel.precision=fp32", "parallel.zero_stage=2",
            "model.drop_path_rate=0.0", *PETS_PACKING]
    launch(["--config", "demo_digits", *[a for s in sets for a in ("--set", s)]])
    run_dir = tmp_path / "pets"
    last = [r for r in read_metrics(run_dir) if r.get("val_loss")][-1]
    assert int(last["step"]) == steps
    ref = _per_image(_dynamic(run_dir, 2), images, labels, k=1)  # 2 classes: top-5 is every image
    assert float(last["val_loss"]) == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert abs(float(last["val_top1"]) * ref["count"] / 100 - ref["top1"]) <= ref["ties"] + 1e-9
    assert float(last["val_top5"]) == 100.0

    # distvit eval of the run folder (model.safetensors) and of its last ZeRO-2 checkpoint folder (the shards of
    # both ranks consolidated in memory): the same numbers as the Trainer's.
    tag = run_dir / "checkpoints" / ckio.tag_for_step(steps)
    files = sorted(p.name for p in tag.iterdir())
    assert any(f.startswith("zero_pp_rank_1") for f in files)  # the ZeRO-2 shards of both ranks
    results = []
    for src, out in ((run_dir, run_dir / "eval"), (tag, run_dir / "eval" / tag.name)):
        assert eval_main(["--checkpoint", str(src), "--device", "cpu"]) == 0
        assert f"numbers: {out / 'eval.json'}" in capsys.readouterr().out  # a checkpoint's eval goes under <run>/eval/
        results.append(json.loads((out / "eval.json").read_text()))
    assert results[0]["confusion"] == results[1]["confusion"] and results[1]["weights"] == str(tag)
    assert sorted(p.name for p in tag.iterdir()) == files  # consolidated in memory: nothing written there
    assert results[0]["classes"] == list(PETS) and results[0]["count"] == ref["count"] == len(images)
    assert results[0]["top1"] == pytest.approx(float(last["val_top1"]), abs=100 * ref["ties"] / ref["count"] + 1e-9)
    # A folder that is neither a run nor a checkpoint: one line.
    assert eval_main(["--checkpoint", str(run_dir / "checkpoints")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model.safetensors and no complete checkpoint in it" in err
