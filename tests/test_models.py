"""The ViT family: sizes, timm compatibility (weights and logits), weight files, hooks.

Logit comparisons with timm run in float32 at atol 1e-5, rtol 1e-4: both sides compute the same
ops in the same order except the attention kernel (timm's fused SDPA call vs ours), so they
differ by float32 rounding only (~1e-6 here); a wrong layout or norm placement moves logits by O(1).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distvit import models
from distvit.models import WeightsMismatchError, load_checkpoint, resample_abs_pos_embed

# The counts timm reports (issue 3). vit_huge_patch14_224's default in timm is the headless
# ImageNet-21k trunk (num_classes=0), and create() builds what timm builds by default.
TIMM_PARAM_COUNTS = {
    "vit_tiny_patch16_224": 5717416,
    "vit_small_patch16_224": 22050664,
    "vit_small_patch32_224": 22878952,
    "vit_base_patch16_224": 86567656,
    "vit_base_patch32_224": 88224232,
    "vit_base_patch8_224": 86576872,
    "vit_base_patch16_384": 86859496,
    "vit_large_patch16_224": 304326632,
    "vit_large_patch14_224": 304203752,
    "vit_huge_patch14_224": 630764800,
    "vit_giant_patch14_224": 1012611432,
}
DIGITS_ARGS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                   mlp_ratio=2.0, global_pool="avg", class_token=False)
LOGIT_TOL = dict(atol=1e-5, rtol=1e-4)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def timm_twin(timm, name, **kwargs):
    """timm's own model for one of ours: same name and overrides (vit_digits via timm's class)."""
    if name == "vit_digits":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**{**DIGITS_ARGS, **kwargs})
    return timm.create_model(name, pretrained=False, **kwargs)


def randomize_(model, seed=0):
    """Random values in every parameter (LayerNorm weights near 1): default inits hide layout errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g) * 0.05
                is_norm_scale = isinstance(module, torch.nn.LayerNorm) and name == "weight"
                p.copy_(1.0 + noise if is_norm_scale else noise)
    return model


def test_registry_has_the_issue_models_and_digits():
    names = models.list_models()
    assert set(TIMM_PARAM_COUNTS) | {"vit_digits"} <= set(names)
    assert names == sorted(names)
    assert models.list_models("vit_base_patch16_*") == ["vit_base_patch16_224", "vit_base_patch16_384"]


# The ViT family of vit.py (other files register their own models, tested beside them).
VIT_FAMILY = [n for n in models.list_models() if models.model_entrypoint(n).__module__ == "distvit.models.vit"]


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count_matches_the_issue_table(name):
    with torch.device("meta"):  # no memory, no init time: the giant builds in a fraction of a second
        model = models.create(name)
    assert count(model) == TIMM_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", VIT_FAMILY)
def test_param_count_and_layout_match_timm(name, timm_module):
    with torch.device("meta"):
        ours = models.create(name)
        theirs = timm_twin(timm_module, name)
    assert count(ours) == count(theirs)
    assert ours.num_classes == theirs.num_classes
    if name != "vit_digits":  # timm has no digits cfg; its twin is built from the class
        assert ours.default_cfg["input_size"] == tuple(theirs.pretrained_cfg["input_size"])
        assert ours.default_cfg["mean"] == tuple(theirs.pretrained_cfg["mean"])
    assert [k for k in ours.state_dict()] == [k for k in theirs.state_dict()]


@pytest.mark.parametrize("name,kwargs,img", [
    ("vit_tiny_patch16_224", {}, 224),
    ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False, num_classes=7, img_size=64), 64),
    ("vit_small_patch32_224", dict(init_values=1e-5, qkv_bias=False, in_chans=2, img_size=96), 96),
    ("vit_digits", {}, 8),
])
def test_timm_state_dict_loads_strict_and_gives_same_logits(timm_module, name, kwargs, img):
    theirs = randomize_(timm_twin(timm_module, name, **kwargs)).eval()
    ours = models.create(name, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, ours.patch_embed.in_chans, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, **LOGIT_TOL)
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   theirs.forward_head(theirs.forward_features(x), pre_logits=True), **LOGIT_TOL)
        ours.set_attn_backend("math")
        torch.testing.assert_close(ours(x), expected, **LOGIT_TOL)


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


def test_checkpoint_at_another_img_size_matches_timm(timm_module, tmp_path):
    """224 weights into a 160 model: ours resizes pos_embed as timm's checkpoint_filter_fn does, same logits."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter

    src = randomize_(timm_module.create_model("vit_tiny_patch16_224", num_classes=5))
    path = tmp_path / "tiny224.safetensors"
    save_file(src.state_dict(), str(path))
    theirs = timm_module.create_model("vit_tiny_patch16_224", num_classes=5, img_size=160).eval()
    theirs.load_state_dict(timm_filter(src.state_dict(), theirs), strict=True)
    ours = models.create("vit_tiny_patch16_224", num_classes=5, img_size=160, checkpoint=str(path)).eval()
    assert ours.pos_embed.shape == (1, 1 + 10 * 10, 192)
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed, atol=0, rtol=0)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **LOGIT_TOL)

    # Resizing a built model in place gives the same embedding as resizing on load.
    same = models.create("vit_tiny_patch16_224", num_classes=5, checkpoint=str(path))
    same.set_img_size(160)
    torch.testing.assert_close(same.pos_embed, ours.pos_embed, atol=0, rtol=0)
    assert same.default_cfg["input_size"] == (3, 160, 160)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_state_dict_round_trip_through_files(tmp_path, suffix):
    src = models.create("vit_digits", num_classes=10).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    torch.manual_seed(123)  # a different init, so equality below comes from the file
    dst = models.create("vit_digits", checkpoint=str(path)).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


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


def test_none_overrides_keep_defaults():
    m = models.create("vit_digits", num_classes=None, img_size=None, attn_backend=None)
    assert m.num_classes == 10 and m.patch_embed.img_size == (8, 8)


def test_grad_checkpointing_gives_the_same_grads():
    """Same seed, drop path active: checkpointing restores the RNG, so loss and every grad match exactly."""
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3, 4])
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = models.create("vit_digits", drop_path_rate=0.3).train()
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=0, rtol=0, msg=lambda m: f"grad of {n}: {m}")


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    m = models.create("vit_digits", drop_path_rate=0.5)
    x = torch.randn(8, 1, 8, 8)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        assert not torch.allclose(a, m(x))


@pytest.mark.parametrize("name,kwargs,img", [
    ("vit_digits", {}, 8),
    ("vit_tiny_patch16_224", dict(img_size=64, num_classes=10), 64),
    ("vit_small_patch32_224", dict(img_size=96, global_pool="avg"), 96),
])
def test_flops_per_image_matches_flop_counter(name, kwargs, img):
    """FlopCounterMode counts every conv/addmm/bmm the forward runs (the math backend's attention is bmm)."""
    m = models.create(name, attn_backend="math", **kwargs)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.randn(3, m.patch_embed.in_chans, img, img))
    assert counter.get_total_flops() == 3 * m.flops_per_image()


def test_flops_per_image_matches_the_published_vit_b16_figure():
    """ViT-B/16 at 224: 17.6 G multiply-adds (DeiT's table lists DeiT-B, the same network, at "17.6 GFLOPs",
    counting multiply-adds), so 2 x 17.6 = 35.1 GFLOPs by our 2 x MACs convention."""
    with torch.device("meta"):
        m = models.create("vit_base_patch16_224")
    assert math.isclose(m.flops_per_image() / 2 / 1e9, 17.6, rel_tol=0.005)


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


def test_attention_backends_agree_inside_the_model():
    m = models.create("vit_digits").eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ref = m(x)
        m.set_attn_backend("math")
        torch.testing.assert_close(m(x), ref, **LOGIT_TOL)


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
