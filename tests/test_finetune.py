"""Fine-tuning from pretrained weights (issue 20): a checkpoint with another class count gets a fresh head.

The recipe the README documents for timm weights is `timm.create_model(name, pretrained=True)` then
`safetensors.torch.save_file(model.state_dict(), path)`; here the same call saves a timm model with
random weights (no network), and the trunk must reproduce timm's features exactly (atol 1e-5 as in
tests/model_helpers.py: only the attention kernel differs).
"""
from __future__ import annotations

import logging

import pytest
import torch

from distvit import models
from distvit.models import WeightsMismatchError, load_checkpoint
from model_helpers import LOGIT_TOL, randomize_


@pytest.fixture(scope="module")
def timm_file(timm_module, tmp_path_factory):
    from safetensors.torch import save_file

    src = randomize_(timm_module.create_model("vit_tiny_patch16_224", pretrained=False)).eval()  # 1000 classes
    path = tmp_path_factory.mktemp("timm") / "timm_vit_t16.safetensors"
    save_file(src.state_dict(), str(path))
    return src, path


def test_timm_imagenet_file_fine_tunes_to_10_classes_at_another_size(timm_module, timm_file, caplog):
    from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter

    src, path = timm_file
    torch.manual_seed(5)
    fresh_head = models.create("vit_tiny_patch16_224", num_classes=10, img_size=64).head.state_dict()
    torch.manual_seed(5)
    with caplog.at_level(logging.WARNING, logger="distvit.models.weights"):
        ours = models.create("vit_tiny_patch16_224", num_classes=10, img_size=64, checkpoint=str(path)).eval()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "classifier re-initialised for 10 classes (the file's has 1000): head.weight, head.bias" in lines[0]
    # The head is the model's own initialisation (same seed, same values), not a slice of the file's.
    for k, v in fresh_head.items():
        assert torch.equal(ours.head.state_dict()[k], v), k
    # The trunk is timm's, position embedding resized as timm resizes it: same features.
    theirs = timm_module.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64).eval()
    sd = {k: v for k, v in timm_filter(src.state_dict(), theirs).items() if not k.startswith("head.")}
    theirs.load_state_dict(sd, strict=False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   theirs.forward_head(theirs.forward_features(x), pre_logits=True), **LOGIT_TOL)


def test_reset_head_false_keeps_the_strict_error_and_names_the_fix(timm_file):
    _, path = timm_file
    with pytest.raises(WeightsMismatchError, match=r"head.weight file \(1000, 192\) vs model \(10, 192\).*"
                                                   r"reset_head=True \(config: --set model.reset_head=true\)"):
        models.create("vit_tiny_patch16_224", num_classes=10, img_size=64, checkpoint=str(path), reset_head=False)


def test_reset_head_true_reinitialises_even_with_the_same_class_count(tmp_path):
    from safetensors.torch import save_file

    src = models.create("vit_digits", num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    torch.manual_seed(3)
    dst = models.create("vit_digits", num_classes=10)
    report = load_checkpoint(dst, path, reset_head=True)
    assert report.ok and report.reset_head == ["head.weight", "head.bias"]
    assert not torch.equal(dst.head.weight, src.head.weight)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    # Default (None) with the same class count loads the file's head.
    same = models.create("vit_digits", num_classes=10, checkpoint=str(path))
    assert torch.equal(same.head.weight, src.head.weight)


def test_config_key_reaches_the_model(tmp_path, digits_dir):
    from safetensors.torch import save_file

    from distvit.config import load_config
    from distvit.engine.build import build_model

    src = models.create("vit_digits", num_classes=10, img_size=8, in_chans=1)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    sets = [f"data.train={digits_dir}/train-*.tar", f"model.checkpoint={path}"]
    m = build_model(load_config("configs/demo_digits.yaml", sets + ["model.num_classes=5"]))
    assert m.head.weight.shape == (5, 64)
    assert torch.equal(m.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    with pytest.raises(WeightsMismatchError, match="model.reset_head=true"):
        build_model(load_config("configs/demo_digits.yaml", sets + ["model.num_classes=5", "model.reset_head=false"]))
    m = build_model(load_config("configs/demo_digits.yaml", sets + ["model.reset_head=true"]))
    assert not torch.equal(m.head.weight, src.head.weight)


def test_digits_writer_keeps_the_first_n_classes(tmp_path):
    import tarfile

    from distvit.data import write_digits
    from distvit.data.cli import main as data_main

    assert data_main(["write", "digits", "--classes", "5", "--out", str(tmp_path / "d5"), "--no-progress"]) == 0
    import json

    m = json.loads((tmp_path / "d5" / "dataset.json").read_text())
    assert m["num_classes"] == 5 and m["classes"] == ["0", "1", "2", "3", "4"]
    labels = set()
    for shard in (tmp_path / "d5").glob("*.tar"):
        with tarfile.open(shard) as tar:
            labels |= {int(tar.extractfile(t).read()) for t in tar.getmembers() if t.name.endswith(".cls")}
    assert labels == {0, 1, 2, 3, 4}
    assert m["samples"]["train"] + m["samples"]["val"] == 901  # sklearn digits 0-4: 178+182+177+183+181
    with pytest.raises(ValueError, match="give 2 to 10"):
        write_digits(tmp_path / "x", classes=11)
