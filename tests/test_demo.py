"""The main job end to end: the digits demo through the deepspeed launcher on 2 CPU ranks."""
import pytest
import torch

from distvit import models
from trainer_helpers import launch, read_metrics, summary


@pytest.mark.slow
@pytest.mark.multirank
def test_demo_reaches_95_top1_through_deepspeed_launcher(tmp_path):
    from distvit.data import build_val_loader, write_digits
    from distvit.config import load_config

    write_digits(tmp_path / "digits")
    sets = [f"run.output_dir={tmp_path}/runs", f"data.train={tmp_path}/digits/train-*.tar",
            f"data.val={tmp_path}/digits/val-*.tar", "log.progress=false"]
    args = ["--config", "configs/demo_digits.yaml"] + [a for s in sets for a in ("--set", s)]
    proc = launch(args, launcher="deepspeed", timeout=600)
    assert "done: finished" in proc.stdout and "val top-1" in proc.stdout
    run_dir = tmp_path / "runs" / "demo_digits"
    s = summary(run_dir)
    assert s["status"] == "finished" and s["final_top1"] >= 95.0, s
    assert s["epochs"] == pytest.approx(30.0)
    rows = read_metrics(run_dir)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    # The exported fp32 weights load by name and give the top-1 the run reported.
    cfg = load_config("configs/demo_digits.yaml", sets)
    model = models.create("vit_digits", checkpoint=s["weights"], num_classes=10, img_size=8, in_chans=1).eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels, valid in build_val_loader(cfg.data, dp_rank=0, dp_size=1):
            pred = model(images).argmax(-1)
            correct += int(((pred == labels) & valid).sum())
            total += int(valid.sum())
    assert total == 360  # the whole val split, each sample once
    assert 100 * correct / total == pytest.approx(s["final_top1"], abs=1e-6)
