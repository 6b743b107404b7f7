"""Optimisation recipes: layer decay against timm's param_groups_layer_decay, LAMB against timm's Lamb,
clip by value, every schedule.kind (cosine, linear, constant, wsd) by hand, SGD against torch's SGD on
hand-made groups, freezing, and the config's refusals."""
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


# --- schedule.kind by hand: peak 1e-3, min_lr 1e-5, 20 steps, 4 of warm-up (0-based optimizer steps)
PEAK, MIN, TOTAL, WARM = 1e-3, 1e-5, 20, 4


def _hand_lr(kind: str, s: int, decay_fraction: float = 0.25) -> float:
    """The closed forms, written out: warm-up (s + 1) / W of the peak; then over the T - W decay steps
    (progress p = (s - W) / (T - W), held at 1 past the end) cosine min + (peak - min) (1 + cos(pi p)) / 2,
    linear min + (peak - min) (1 - p), constant the peak; wsd the peak until the last round(f T) steps,
    then min + (peak - min) (1 - k / (f T)) at the k-th of them, min from there on."""
    import math

    if s < WARM:
        return PEAK * (s + 1) / WARM
    p = min(1.0, (s - WARM) / (TOTAL - WARM))
    if kind == "cosine":
        return MIN + (PEAK - MIN) * (1 + math.cos(math.pi * p)) / 2
    if kind == "linear":
        return MIN + (PEAK - MIN) * (1 - p)
    if kind == "constant":
        return PEAK
    n = round(decay_fraction * TOTAL)
    k = s - (TOTAL - n)
    return PEAK if k < 0 else MIN + (PEAK - MIN) * max(0.0, 1 - k / n)


# steps: warm-up (0, 3), first decay step (4), the middle of the decay (12), the last step (19), past the end (20, 30)
STEPS_CHECKED = [0, 1, 3, 4, 8, 12, 16, 17, 19, 20, 30]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_schedule_lr_by_hand(kind):
    """The lr each param group steps with (LambdaLR over two groups, one at half the peak as layer decay
    makes them) equals the closed form at warm-up, middle, end and past the end (the min_lr floor)."""
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": PEAK}, {"params": [q], "lr": PEAK / 2}], lr=PEAK)
    sched = build_scheduler(opt, total_steps=TOTAL, warmup_steps=WARM, kind=kind, peak_lr=PEAK, min_lr=MIN,
                            decay_fraction=0.25)
    got = {}
    for s in range(max(STEPS_CHECKED) + 1):
        got[s] = [g["lr"] for g in opt.param_groups]  # the lr optimizer step s runs with
        opt.step()
        sched.step()
    for s in STEPS_CHECKED:
        assert got[s] == pytest.approx([_hand_lr(kind, s), _hand_lr(kind, s) / 2], rel=1e-12), (kind, s)
    # the same points as numbers, so a wrong closed form above cannot hide a wrong schedule
    literal = {
        "cosine": {0: 2.5e-4, 3: 1e-3, 4: 1e-3, 12: (PEAK + MIN) / 2, 20: MIN, 30: MIN},
        "linear": {0: 2.5e-4, 3: 1e-3, 4: 1e-3, 8: MIN + 0.75 * (PEAK - MIN), 12: (PEAK + MIN) / 2, 20: MIN, 30: MIN},
        "constant": {0: 2.5e-4, 3: 1e-3, 12: PEAK, 19: PEAK, 30: PEAK},
        # decay_fraction 0.25 of 20: steps 15-19 decay, 15 is still the peak, 17 is 3/5 of the way up from min
        "wsd": {0: 2.5e-4, 12: PEAK, 15: PEAK, 17: MIN + 0.6 * (PEAK - MIN), 19: MIN + 0.2 * (PEAK - MIN), 20: MIN, 30: MIN},
    }[kind]
    for s, lr in literal.items():
        assert got[s][0] == pytest.approx(lr, rel=1e-12), (kind, s)
    if kind == "cosine":  # a quarter of the way: (1 + cos(pi / 4)) / 2 = 0.8535533905932737 of the span
        assert got[8][0] == pytest.approx(MIN + 0.8535533905932737 * (PEAK - MIN), rel=1e-12)
    if kind in ("cosine", "linear"):  # the last step is one decay step short of min_lr, never below it
        assert MIN < got[19][0] < got[16][0] and min(lr for lrs in got.values() for lr in lrs[:1]) >= MIN


def test_schedule_without_warmup_starts_at_the_peak():
    for kind in ("cosine", "linear", "constant", "wsd"):
        assert lr_multiplier(0, total_steps=10, warmup_steps=0, kind=kind, min_ratio=0.1) == 1.0
    assert lr_multiplier(5, total_steps=10, warmup_steps=0, kind="linear", min_ratio=0.0) == 0.5


def _hand_sgd_groups(model, weight_decay: float, lr: float, layer_decay: float | None) -> dict[str, dict]:
    """Per parameter name, the lr and weight decay written out for vit_digits (4 blocks, no cls token,
    fc_norm + head): no decay on 1-D tensors and pos_embed; layers pos_embed / patch_embed 0, blocks.i
    i + 1, fc_norm and head 5, lr scale layer_decay ** (5 - layer)."""
    depth = len(model.blocks)
    out = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name == "pos_embed"
        if name.startswith(("pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("fc_norm", "head")), name
            layer = depth + 1
        scale = 1.0 if layer_decay is None else layer_decay ** (depth + 1 - layer)
        out[name] = {"lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay}
    return out


@pytest.mark.parametrize("momentum,layer_decay", [(0.8, None), (0.8, 0.75), (0.0, 0.75)])
def test_sgd_steps_equal_torch_sgd_on_hand_made_groups(momentum, layer_decay):
    """optim.name=sgd through build_optimizer takes the same steps as torch.optim.SGD given, per parameter,
    the lr and weight decay written out by hand (no-decay tensors, layer-decay scales), Nesterov momentum;
    and its first step is the closed form p - lr (1 + m) (g + wd p) (Nesterov's first step: buf = g)."""
    lr, wd = 0.05, 0.1
    torch.manual_seed(0)
    model = models.create("vit_digits", num_classes=10)
    twin = models.create("vit_digits", num_classes=10)
    twin.load_state_dict(model.state_dict())
    sets = ["optim.name=sgd", f"optim.momentum={momentum}", f"optim.lr={lr}", f"optim.weight_decay={wd}"]
    if layer_decay is not None:
        sets.append(f"optim.layer_decay={layer_decay}")
    ours = build_optimizer(model, load_config(None, sets), torch.device("cpu"))
    hand = _hand_sgd_groups(twin, wd, lr, layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for g in ours.param_groups:
        assert g["momentum"] == momentum and g["nesterov"] == (momentum > 0) and g["dampening"] == 0
        for p in g["params"]:
            seen[names[id(p)]] = {"lr": g["lr"], "weight_decay": g["weight_decay"]}
    assert seen.keys() == hand.keys()
    for n in hand:
        assert seen[n]["lr"] == pytest.approx(hand[n]["lr"], rel=1e-12) and seen[n]["weight_decay"] == hand[n]["weight_decay"], n
    assert len({h["weight_decay"] for h in hand.values()}) == 2
    assert len({round(h["lr"], 12) for h in hand.values()}) == (1 if layer_decay is None else 6)

    theirs = torch.optim.SGD([{"params": [p], **hand[n]} for n, p in twin.named_parameters()], lr=lr,
                             momentum=momentum, nesterov=momentum > 0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            p.grad, q.grad = grads[n].clone(), grads[n].clone()
        ours.step(), theirs.step()
        if step == 0:
            for n, p in model.named_parameters():
                h = hand[n]
                expected = start[n] - h["lr"] * (1 + momentum) * (grads[n] + h["weight_decay"] * start[n])
                torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")
    a, b = dict(model.named_parameters()), dict(twin.named_parameters())
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
        assert not torch.equal(a[n], start[n]), n
