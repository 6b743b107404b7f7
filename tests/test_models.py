"""The ViT family beyond the model contract (tests/test_model_contract.py: sizes, timm layout and logits,
weight round trips, checkpointing, drop path, FLOPs, backends): position-embedding resampling, foreign
and broken weight files, error messages, hooks, and learning the digits.
"""
from __future__ import annotations

import math

import pytest
import torch

from distvit import models
from distvit.models import WeightsMismatchError, load_checkpoint, resample_abs_pos_embed
from model_helpers import count


def test_resample_matches_timm_including_non_square_grids(timm_module):
    from timm.layers import resample_abs_pos_embed as timm_resample

    posemb = torch.randn(1, 1 + 14 * 14, 32, generator=torch.Generator().manual_seed(0))
    for new in [(10, 10), (20, 20), (10, 16)]:
        ours = resample_abs_pos_embed(posemb, new, num_prefix_tokens=1)
        assert ours.shape == (1, 1 + new[0] * new[1], 32)
        assert torch.equal(ours[:, :1], posemb[:, :1])  # the class token's embedding is kept
        torch.testing.assert_close(ours, timm_resample(posemb, list(new), num_prefix_tokens=1), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"197 position tokens minus 0 prefix token\(s\) = 197 is not a square grid; "
                                         r"pass old_grid=\(h, w\)"):
        resample_abs_pos_embed(posemb, (10, 10), num_prefix_tokens=0)


def test_wrapped_and_prefixed_checkpoints_load(tmp_path):
    """DeepSpeed / DDP files: {"module": {"module.<key>": ...}, "epoch": 3} loads into the bare model."""
    src = models.create("vit_digits")
    path = tmp_path / "ds.pt"
    torch.save({"module": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = models.create("vit_digits", checkpoint=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_mismatch_report_names_every_kind_of_key(tmp_path):
    from safetensors.torch import save_file

    src = models.create("vit_digits")
    sd = dict(src.state_dict())
    del sd["blocks.0.attn.qkv.weight"]
    sd["decoder.weight"] = torch.zeros(3)
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))

    with pytest.raises(WeightsMismatchError) as err:
        models.create("vit_digits", num_classes=5, checkpoint=str(path))
    msg = str(err.value)
    assert msg.startswith(f"weights file {str(path)!r} does not fit VisionTransformer: ")
    assert "1 missing (in the model, not in the file): blocks.0.attn.qkv.weight" in msg
    assert "1 unexpected (in the file, not in the model): decoder.weight" in msg
    assert "2 with another shape: head.weight file (10, 64) vs model (5, 64), head.bias file (10,) vs model (5,)" in msg
    assert "load with strict=False" in msg

    torch.manual_seed(7)
    dst = models.create("vit_digits", num_classes=5)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_checkpoint(dst, path, strict=False)
    assert report.missing == ["blocks.0.attn.qkv.weight"] and report.unexpected == ["decoder.weight"]
    assert [k for k, _, _ in report.mismatched] == ["head.weight", "head.bias"]
    after = dst.state_dict()
    for k in ("blocks.0.attn.qkv.weight", "head.weight", "head.bias"):
        assert torch.equal(after[k], before[k]), f"{k} should keep its initial value"
    assert torch.equal(after["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])


class NotATensor:
    pass


def test_weight_file_errors(tmp_path):
    m = models.create("vit_digits")
    with pytest.raises(FileNotFoundError, match="weights file '.*nope.pt' does not exist"):
        load_checkpoint(m, tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"has suffix '\.npz'; supported: \.safetensors, \.pt, \.pth, \.bin"):
        load_checkpoint(m, tmp_path / "w.npz")
    torch.save({"state_dict": m.state_dict(), "extra": NotATensor()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"holds Python objects besides tensors, which torch.load\(weights_only=True\) "
                                         r"refuses for safety"):
        load_checkpoint(m, tmp_path / "pickled.pt")


def test_checkpoint_without_class_token_into_model_with_one(tmp_path):
    src = models.create("vit_tiny_patch16_224", global_pool="avg", class_token=False, img_size=32)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    with pytest.raises(ValueError, match=r"checkpoint pos_embed has 4 tokens, which is not this model's 1 prefix "
                                         r"token\(s\) plus a square patch grid; was it saved with class_token=False"):
        models.create("vit_tiny_patch16_224", img_size=32, checkpoint=str(path))


def test_unknown_model_and_option_errors():
    with pytest.raises(ValueError, match=r"^unknown model 'vit_bsae_patch16_224'; did you mean vit_base_patch16_224"):
        models.create("vit_bsae_patch16_224")
    with pytest.raises(ValueError, match=r"^unknown model 'resnet50'; registered models: .*vit_base_patch16_224, .*vit_digits,"):
        models.create("resnet50")
    with pytest.raises(TypeError, match=r"^vit_digits: unknown option 'num_clases'; did you mean num_classes, .*valid options: attn_backend, "):
        models.create("vit_digits", num_clases=3)
    with pytest.raises(ValueError, match=r"global_pool='token' needs class_token=True"):
        models.create("vit_digits", global_pool="token", class_token=False)
    with pytest.raises(ValueError, match=r"global_pool='max'; choose one of token, avg"):
        models.create("vit_digits", global_pool="max")
    with pytest.raises(ValueError, match=r"image height 30 is not a multiple of patch size 16"):
        models.create("vit_tiny_patch16_224", img_size=30)
    m = models.create("vit_digits")
    with pytest.raises(ValueError, match=r"input has shape \(2, 3, 8, 8\), expected \(batch, 1, 8, 8\)"):
        m(torch.randn(2, 3, 8, 8))


def test_hooks_and_attributes():
    m = models.create("vit_small_patch16_224", img_size=64, num_classes=3, init_values=1e-5)
    assert (m.embed_dim, m.num_heads, m.num_prefix_tokens, m.patch_embed.num_patches) == (384, 6, 1, 16)
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    assert m.default_cfg["input_size"] == (3, 64, 64) and m.default_cfg["num_classes"] == 3
    assert m.default_cfg["mean"] == (0.5, 0.5, 0.5) and m.default_cfg["std"] == (0.5, 0.5, 0.5)
    assert torch.equal(m.blocks[0].ls1.gamma, torch.full((384,), 1e-5))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 17, 384)
        assert m.forward_head(feats, pre_logits=True).shape == (2, 384)
        assert m.forward_head(feats).shape == (2, 3)
    m.reset_classifier(0)
    assert count(m.head) == 0 and m(x).shape == (2, 384)
    d = models.create("vit_digits")
    assert (d.num_prefix_tokens, d.cls_token, d.default_cfg["input_size"]) == (0, None, (1, 8, 8))


@pytest.mark.slow
def test_vit_digits_learns_sklearn_digits():
    """The demo model reaches >= 95% val top-1 on sklearn digits in 30 epochs on one CPU thread (~30 s)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    data = load_digits()
    x = (torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1) - 0.305) / 0.376
    x_tr, x_va, y_tr, y_va = train_test_split(x, torch.tensor(data.target), test_size=0.2, random_state=0,
                                              stratify=data.target)
    m = models.create("vit_digits")
    epochs, batch = 30, 64
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * math.ceil(len(x_tr) / batch),
                                                pct_start=0.1)
    for _ in range(epochs):
        m.train()
        perm = torch.randperm(len(x_tr))
        for i in range(0, len(x_tr), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(m(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    m.eval()
    with torch.no_grad():
        acc = (m(x_va).argmax(-1) == y_va).float().mean().item()
    assert acc >= 0.95, f"val top-1 {acc:.3f}"
