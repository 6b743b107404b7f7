"""Optimisation recipes: layer decay against timm's param_groups_layer_decay, LAMB against timm's Lamb,
clip by value, the wsd schedule by hand, freezing, and the config's refusals."""
from __future__ import annotations

import pytest
import torch

from distvit import models
from distvit.config import ConfigError, load_config
from distvit.engine.optim import Lamb, build_optimizer, clamp_grads_before_step, freeze_parameters, layer_decay_groups
from distvit.engine.schedule import build_scheduler, lr_multiplier


@pytest.mark.parametrize("name,kwargs", [
    ("deit_tiny_patch16_224", {}), ("deit_tiny_distilled_patch16_224", {}),
    ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 2, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1)}),
])
def test_layer_decay_groups_equal_timm(timm_module, name, kwargs):
    from timm.optim import param_groups_layer_decay

    ours = models.create(name, **kwargs)
    theirs = timm_module.create_model(name, pretrained=False, **kwargs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    expected = {}
    ptr_name = {id(p): n for n, p in theirs.named_parameters()}
    for g in param_groups_layer_decay(theirs, weight_decay=0.05, layer_decay=0.65,
                                      no_weight_decay_list=theirs.no_weight_decay()):
        for p in g["params"]:
            expected[ptr_name[id(p)]] = (g["lr_scale"], g["weight_decay"])
    got = {}
    names = {id(p): n for n, p in ours.named_parameters()}
    groups = layer_decay_groups(ours, 0.05, 2e-3, 0.65)
    for g in groups:
        for p in g["params"]:
            got[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
        assert g["lr"] == pytest.approx(2e-3 * g["lr_scale"])
    assert got.keys() == expected.keys()
    for n in got:
        assert got[n][0] == pytest.approx(expected[n][0]) and got[n][1] == expected[n][1], n
    assert groups[0]["lr_scale"] == 1.0  # head first: the logged lr is the peak
    assert len({s for s, _ in got.values()}) > 3


def test_lamb_equals_timm(timm_module):
    from timm.optim import Lamb as TimmLamb

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.zeros(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]  # noqa: E731
    ours = Lamb(groups(a), lr=0.01, eps=1e-6)
    theirs = TimmLamb(groups(b), lr=0.01, eps=1e-6, max_grad_norm=None)
    for step in range(4):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ours.step(), theirs.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a[0], b[0].new_zeros(b[0].shape))


def test_clip_by_value_clamps_what_the_step_sees():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    clamp_grads_before_step(opt, 0.5)
    p.grad = torch.tensor([2.0, -3.0, 0.1, -0.2])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.5, 0.5, -0.1, 0.2]))


def test_wsd_schedule_by_hand():
    m = [lr_multiplier(s, total_steps=20, warmup_steps=2, kind="wsd", min_ratio=0.1, decay_fraction=0.25)
         for s in range(20)]
    assert m[:2] == [0.5, 1.0] and m[2:15] == [1.0] * 13
    # the last 5 steps decay linearly: 1 - k/5 of the way from 1 to 0.1
    assert m[15:] == pytest.approx([0.1 + 0.9 * (1 - k / 5) for k in range(5)])


def test_layer_decay_lrs_survive_the_schedule():
    model = models.create("vit_digits", num_classes=10)
    cfg = load_config(None, ["optim.layer_decay=0.5", "optim.lr=1e-2"])
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, total_steps=10, warmup_steps=4, kind="cosine", peak_lr=1e-2, min_lr=0.0)
    scales = [g["lr_scale"] for g in opt.param_groups]
    for _ in range(3):
        opt.step(), sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([1e-2 * 4 / 4 * s for s in scales])  # warmup step 3 of 4: multiplier 1.0
    assert min(scales) < 0.1


def test_freeze_by_pattern_and_bad_pattern():
    model = models.create("vit_digits", num_classes=10)
    n = freeze_parameters(model, ["patch_embed.*", "blocks.0.*"])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert n == len(frozen) and frozen and all(f.startswith(("patch_embed.", "blocks.0.")) for f in frozen)
    opt = build_optimizer(model, load_config(None, []), torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match=r"model.freeze pattern 'block.0.\*' matches no parameter.*close names: blocks.0"):
        freeze_parameters(model, ["block.0.*"])


def test_optimizer_choices_and_refusals():
    model = models.create("vit_digits", num_classes=10)
    sgd = build_optimizer(model, load_config(None, ["optim.name=sgd", "optim.momentum=0.8"]), torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    lamb = build_optimizer(model, load_config(None, ["optim.name=lamb", "parallel.zero_stage=0"]), torch.device("cpu"))
    assert isinstance(lamb, Lamb)
    with pytest.raises(ConfigError, match=r"optim.name=lamb needs whole tensors.*set parallel.zero_stage=0"):
        load_config(None, ["optim.name=lamb"])
    with pytest.raises(ConfigError, match=r"optim.name=sgd with parallel.offload=cpu"):
        load_config(None, ["optim.name=sgd", "parallel.offload=cpu"])
    with pytest.raises(ConfigError, match=r"optim.layer_decay must be in \(0, 1\]"):
        load_config(None, ["optim.layer_decay=1.5"])
