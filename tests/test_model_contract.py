"""The contract every registered model keeps, parametrized over `distvit.models.list_models()` (timm's
test_models.py habit): it builds with its defaults and with a family's tiny overrides; it has timm's
state-dict names and shapes and gives timm's logits from timm's weights (where timm has the model); its
state dict survives a weights file; gradient checkpointing gives the same gradients; drop path acts in
training only; flops_per_image is what a FLOP counter counts; the attention backends agree.

A model joins the contract through its family's row in FAMILIES (a new model file must add one: the first
test fails otherwise), whose flags say which hooks the family has; the flags are checked against the
models, so a family cannot skip a check by leaving its flag off while having the hook. The tiny overrides
(few, narrow blocks at a few patches) keep every variant's own flags (patch size, layer scale, pooling,
window size, distillation token) while making each case milliseconds; timm gets the same overrides, and
the full-size layouts are compared on the meta device. Family-specific behaviour (Swin's windows and masks,
DeiT's distillation heads, the causal ViT's KV cache) is tested beside each family.

Logit tolerances: tests/model_helpers.py.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distvit import models
from distvit.models.causal_vit import CausalViT
from model_helpers import LOGIT_TOL, TIMM_DIGITS, count, randomize_, timm_twin


@dataclass(frozen=True)
class Family:
    tiny: dict  # overrides that make a registered variant small (the digits models are small already)
    timm: bool  # timm has every model of the family (the digits ones: built from timm's classes)
    classifier: bool  # timm's classifier hooks: num_classes, forward_features / forward_head, reset_classifier
    grad_checkpointing: bool  # set_grad_checkpointing
    drop_path: bool  # drop_path_rate
    flops: bool  # flops_per_image
    cfg_keys: tuple = ()  # default_cfg entries that equal timm's pretrained_cfg


VIT_TINY = dict(embed_dim=32, depth=2, num_heads=2)
FAMILIES = {  # keyed by the module that registers the family
    "distvit.models.vit": Family(VIT_TINY, timm=True, classifier=True, grad_checkpointing=True, drop_path=True,
                                 flops=True, cfg_keys=("input_size", "mean", "std")),
    "distvit.models.deit": Family(VIT_TINY, timm=True, classifier=True, grad_checkpointing=True, drop_path=True,
                                  flops=True, cfg_keys=("input_size", "mean", "std")),
    # 64 px: stage grids 16, 8, 4, 2; windows of 7 and 12 are padded, then shrink to the grid.
    "distvit.models.swin": Family(dict(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), img_size=64),
                                  timm=True, classifier=True, grad_checkpointing=True, drop_path=True, flops=True,
                                  cfg_keys=("input_size", "mean", "std", "pool_size")),
    "distvit.models.causal_vit": Family(dict(VIT_TINY, img_size=32), timm=False, classifier=False,
                                        grad_checkpointing=True, drop_path=True, flops=True),
}
SMALL_ALREADY = {"vit_digits", "deit_digits_distilled", "swin_digits", "vit_causal_digits"}

# Parameter counts timm reports (issues 3 and 10). vit_huge_patch14_224's default in timm is the headless
# ImageNet-21k trunk (num_classes=0), and create() builds what timm builds by default.
PUBLISHED_PARAM_COUNTS = {
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
    "deit_tiny_patch16_224": 5717416,
    "deit_small_patch16_224": 22050664,
    "deit_base_patch16_224": 86567656,
    "deit_small_distilled_patch16_224": 22436432,
    "deit_base_distilled_patch16_224": 87338192,
    "deit3_base_patch16_224": 86585320,
    "swin_tiny_patch4_window7_224": 28288354,
    "swin_small_patch4_window7_224": 49606258,
    "swin_base_patch4_window7_224": 87768224,
    "swin_base_patch4_window12_384": 87903584,
    "swin_large_patch4_window7_224": 196532476,
}
# Published multiply-adds per image (G) and the tolerance on our 2 x MACs / 2: ViT-B/16 at 224 is
# 17.6 G (DeiT's table lists DeiT-B, the same network, at "17.6 GFLOPs", counting multiply-adds);
# Swin-T at 224 is 4.5 G (the paper's "4.5G FLOPs" entry counts multiply-adds; it rounds to 0.1).
PUBLISHED_GMACS = {"vit_base_patch16_224": (17.6, 0.005 * 17.6), "swin_tiny_patch4_window7_224": (4.5, 0.05)}

NAMES = models.list_models()
TIMM_NAMES = [n for n in NAMES if FAMILIES[models.model_entrypoint(n).__module__].timm]


def family(name: str) -> Family:
    return FAMILIES[models.model_entrypoint(name).__module__]


def tiny_kwargs(name: str) -> dict:
    if name in SMALL_ALREADY:
        return {}
    kw = dict(family(name).tiny)
    kw.setdefault("img_size", 2 * int(re.search(r"patch(\d+)", name).group(1)))  # 4 patches
    return kw


@functools.lru_cache(maxsize=None)
def full_size_on_meta(name: str):
    """The model with its defaults on the meta device (shapes, no storage), built once for the tests that read it."""
    with torch.device("meta"):  # no memory, no init time: the giant builds in a fraction of a second
        return models.create(name)


def tiny_signature(name: str) -> tuple:
    """The tiny model's architecture: every module's type and plain attributes (pooling, prefix tokens, window
    and patch sizes, layer scale...), built on the meta device. Variants that differ only in what the tiny
    overrides replace (width, depth, heads, image size) share one; their full sizes are the layout test's."""
    with torch.device("meta"):
        m = models.create(name, **tiny_kwargs(name))
    plain = (bool, int, float, str, tuple, type(None))
    return tuple((n, type(mod).__qualname__, tuple(sorted((k, v) for k, v in vars(mod).items()
                                                          if not k.startswith("_") and isinstance(v, plain))))
                 for n, mod in m.named_modules())


def distinct_tiny(names: list[str]) -> list[str]:
    """The first name of each distinct tiny architecture: the behaviour tests run each architecture once."""
    seen: dict[tuple, str] = {}
    for name in names:
        seen.setdefault(tiny_signature(name), name)
    return sorted(seen.values())


def input_shape(model) -> tuple[int, ...]:
    if hasattr(model, "default_cfg"):
        return tuple(model.default_cfg["input_size"])
    cfg = model.cfg  # the causal ViT
    return (cfg.in_chans, cfg.img_size, cfg.img_size)


def images(model, batch=2, seed=1) -> torch.Tensor:
    return torch.randn(batch, *input_shape(model), generator=torch.Generator().manual_seed(seed))


TINY = distinct_tiny(NAMES)  # ~15 of the ~45 names
TIMM_TINY = [n for n in TINY if family(n).timm]


def as_tensor(out) -> torch.Tensor:
    """One tensor from a model's output (a distilled DeiT in training returns its two heads)."""
    return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out


# --- the registry and building -------------------------------------------------------------------------


def test_every_registered_model_has_a_family_row_and_the_published_names():
    for name in NAMES:
        assert models.model_entrypoint(name).__module__ in FAMILIES, f"{name}: add its family to FAMILIES"
    assert NAMES == sorted(NAMES)
    assert set(PUBLISHED_PARAM_COUNTS) | set(TIMM_DIGITS) <= set(TIMM_NAMES) and SMALL_ALREADY <= set(NAMES)
    assert models.list_models("vit_base_patch16_*") == ["vit_base_patch16_224", "vit_base_patch16_384"]


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_defaults_and_tiny_overrides(name):
    fam = family(name)
    full = full_size_on_meta(name)
    assert count(full) == PUBLISHED_PARAM_COUNTS.get(name, count(full)) > 0  # timm's counts, where published
    assert len(input_shape(full)) == 3
    m = models.create(name, **tiny_kwargs(name)).eval()
    with torch.device("meta"):
        unset = models.create(name, **{**dict.fromkeys(("num_classes", "img_size", "in_chans", "attn_backend")),
                                       **tiny_kwargs(name)})
    assert {k: v.shape for k, v in unset.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert input_shape(unset) == input_shape(m)  # None keeps the default
    # The family's flags are what the model has: a flag cannot be off while the hook is there.
    assert hasattr(m, "set_grad_checkpointing") == fam.grad_checkpointing
    assert hasattr(m, "flops_per_image") == fam.flops
    assert all(hasattr(m, h) for h in ("forward_features", "forward_head", "reset_classifier", "no_weight_decay",
                                       "num_classes")) == fam.classifier
    if not fam.drop_path:
        with pytest.raises((TypeError, ValueError), match="drop_path_rate"):
            models.create(name, drop_path_rate=0.1, **tiny_kwargs(name))
    x = images(m)
    with torch.no_grad():
        out = m(x)
    if fam.classifier:
        assert out.shape == (2, m.num_classes or m.num_features)
    else:
        assert out.shape == (2, m.num_patches, m.patch_dim)
    with pytest.raises((TypeError, ValueError), match=rf"^{name}: unknown (option|override\(s\)) '?not_an_option"):
        models.create(name, not_an_option=1)


# --- timm ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_full_size_layout_matches_timm(name, timm_module):
    """Every name at its real size, on the meta device: timm's keys in timm's order, the same shapes, the same
    number of classes and the same pretrained cfg (the family's cfg_keys: input size, mean, std, Swin's pool
    size)."""
    ours = full_size_on_meta(name)
    with torch.device("meta"):
        theirs = timm_twin(timm_module, name)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
           [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    assert count(ours) == count(theirs)
    assert ours.num_classes == theirs.num_classes
    if name not in TIMM_DIGITS:  # timm has no cfg for the digits models, built from its classes
        for key in family(name).cfg_keys:
            assert ours.default_cfg[key] == tuple(theirs.pretrained_cfg[key]), key


# Options beyond the tiny overrides (each was a case of the families' own files): pooling, class token,
# layer scale, qkv bias, channels, classes, padded and resized Swin windows, and the real sizes.
OPTION_CASES = [
    ("vit_tiny_patch16_224", {}),
    ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False, num_classes=7, img_size=64)),
    ("vit_small_patch32_224", dict(init_values=1e-5, qkv_bias=False, in_chans=2, img_size=96)),
    ("deit_small_distilled_patch16_224", dict(img_size=64, num_classes=7)),
    ("deit3_base_patch16_224", dict(img_size=48, depth=2)),
    ("deit_tiny_patch16_224", dict(img_size=32)),
    # 96 px: a 24x24 grid is padded to 28x28 windows of 7, stage 3's 6x6 grid shrinks the window and stops shifting.
    ("swin_tiny_patch4_window7_224", dict(img_size=96, num_classes=5)),
    ("swin_tiny_patch4_window7_224", dict(img_size=128, window_size=8, in_chans=2)),
    ("swin_tiny_patch4_window7_224", {}),
]
LOGIT_CASES = [pytest.param(n, tiny_kwargs(n), id=f"{n}-tiny") for n in TIMM_TINY] + \
              [pytest.param(n, kw, id=f"{n}-option{i}") for i, (n, kw) in enumerate(OPTION_CASES)]


@pytest.mark.parametrize("name,kwargs", LOGIT_CASES)
def test_timm_state_dict_loads_strict_and_gives_same_logits(timm_module, name, kwargs):
    theirs = randomize_(timm_twin(timm_module, name, **kwargs)).eval()
    ours = models.create(name, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = images(ours)
    with torch.no_grad():
        their_feats = theirs.forward_features(x)
        expected = theirs.forward_head(their_feats)  # timm's forward(), one trunk pass
        torch.testing.assert_close(ours(x), expected, **LOGIT_TOL)
        feats = ours.forward_features(x)
        torch.testing.assert_close(feats, their_feats, **LOGIT_TOL)
        torch.testing.assert_close(ours.forward_head(feats, pre_logits=True),
                                   theirs.forward_head(their_feats, pre_logits=True), **LOGIT_TOL)
        ours.set_attn_backend("math")
        torch.testing.assert_close(ours(x), expected, **LOGIT_TOL)


@pytest.mark.parametrize("name,new_size", [("vit_tiny_patch16_224", 160), ("deit3_small_patch16_224", 96),
                                           ("deit_tiny_distilled_patch16_224", 96)])
def test_checkpoint_at_another_img_size_matches_timm(timm_module, tmp_path, name, new_size):
    """224 weights into a smaller model: the position embedding (with one or two prefix tokens, or patch-only
    for DeiT III) is resized as timm's checkpoint_filter_fn does; same logits. Resizing a built model in
    place gives the same embedding as resizing on load."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter

    src = randomize_(timm_module.create_model(name, num_classes=5))
    path = tmp_path / "w224.safetensors"
    save_file(src.state_dict(), str(path))
    theirs = timm_module.create_model(name, num_classes=5, img_size=new_size).eval()
    theirs.load_state_dict(timm_filter(src.state_dict(), theirs, adapt_layer_scale=True), strict=True)
    ours = models.create(name, num_classes=5, img_size=new_size, checkpoint=str(path)).eval()
    assert ours.pos_embed.shape == theirs.pos_embed.shape
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed, atol=0, rtol=0)
    x = torch.randn(2, 3, new_size, new_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **LOGIT_TOL)
    same = models.create(name, num_classes=5, checkpoint=str(path))
    same.set_img_size(new_size)
    torch.testing.assert_close(same.pos_embed, ours.pos_embed, atol=0, rtol=0)
    assert same.default_cfg["input_size"] == (3, new_size, new_size)


# --- weights files -------------------------------------------------------------------------------------


# torch.save files go through the same loader for every model: one model checks the suffixes.
ROUND_TRIP_CASES = [pytest.param(n, ".safetensors", id=n) for n in TINY] + \
                   [pytest.param("vit_digits", suffix, id=f"vit_digits{suffix}") for suffix in (".pt", ".pth")]


@pytest.mark.parametrize("name,suffix", ROUND_TRIP_CASES)
def test_state_dict_round_trip_through_files(tmp_path, name, suffix):
    kwargs = tiny_kwargs(name)
    src = randomize_(models.create(name, **kwargs)).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    torch.manual_seed(123)  # another init, so equality below comes from the file
    dst = models.create(name, checkpoint=str(path), **kwargs).eval()
    assert list(dst.state_dict()) == list(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = images(src, batch=3)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


# --- training behaviour --------------------------------------------------------------------------------


def _scalar_loss(out) -> torch.Tensor:
    out = as_tensor(out)
    return (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().mean()


@pytest.mark.parametrize("name", [n for n in TINY if family(n).grad_checkpointing])
def test_grad_checkpointing_gives_the_same_grads(name):
    """Same seed, drop path active: checkpointing restores the RNG, so loss and every grad match exactly."""
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = models.create(name, drop_path_rate=0.3, **tiny_kwargs(name)).train()
        m.set_grad_checkpointing(ckpt)
        x = images(m, batch=4, seed=0)
        torch.manual_seed(1)
        loss = _scalar_loss(m(x))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=0, rtol=0, msg=lambda m: f"grad of {n}: {m}")
    assert any(g.abs().sum() > 0 for g in g0.values())


@pytest.mark.parametrize("name", [n for n in TINY if family(n).drop_path])
def test_drop_path_only_in_training(name):
    torch.manual_seed(0)
    m = models.create(name, drop_path_rate=0.5, **tiny_kwargs(name))
    x = images(m, batch=8)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        torch.manual_seed(1)
        a = as_tensor(m(x))
        torch.manual_seed(2)
        assert not torch.allclose(a, as_tensor(m(x)))


FLOP_CASES = [pytest.param(n, tiny_kwargs(n), id=f"{n}-tiny") for n in TINY if family(n).flops] + [
    pytest.param("vit_tiny_patch16_224", dict(img_size=64, num_classes=10), id="vit_tiny-64"),
    pytest.param("vit_small_patch32_224", dict(img_size=96, global_pool="avg"), id="vit_small32-avg"),
    pytest.param("deit3_small_patch16_224", dict(img_size=64, depth=2), id="deit3_small-64"),
    pytest.param("swin_tiny_patch4_window7_224", dict(img_size=96, num_classes=5), id="swin_tiny-96-padded"),
]


@pytest.mark.parametrize("name,kwargs", FLOP_CASES)
def test_flops_per_image_matches_flop_counter(name, kwargs):
    """FlopCounterMode counts every conv/addmm/bmm the forward runs (the math backend's attention is bmm)."""
    m = models.create(name, attn_backend="math", **kwargs).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(images(m, batch=3))
    total = counter.get_total_flops()
    if isinstance(m, CausalViT):
        # A causal model counts the half of the attention scores its mask keeps (useful work, as
        # FlashAttention's FLOP count does); the counter sees the math backend's full bmm.
        total -= counter.get_flop_counts()["Global"][torch.ops.aten.bmm] // 2
    assert total == 3 * m.flops_per_image()


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_flops_per_image_matches_the_published_figure(name):
    gmacs, tol = PUBLISHED_GMACS[name]
    with torch.device("meta"):
        m = models.create(name)
    assert abs(m.flops_per_image() / 2 / 1e9 - gmacs) <= tol


@pytest.mark.parametrize("name", TINY)
def test_attention_backends_agree_inside_the_model(name):
    sdpa = models.create(name, attn_backend="sdpa", **tiny_kwargs(name)).eval()
    math_ = models.create(name, attn_backend="math", **tiny_kwargs(name)).eval()
    math_.load_state_dict(randomize_(sdpa).state_dict())
    x = images(sdpa)
    with torch.no_grad():
        ref = sdpa(x)
        assert not math.isnan(ref.abs().sum().item())
        torch.testing.assert_close(math_(x), ref, **LOGIT_TOL)
