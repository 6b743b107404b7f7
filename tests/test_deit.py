"""DeiT, distilled DeiT and DeiT III: sizes, timm compatibility (weights and logits, both heads), the
distillation losses against hand-computed values, the teacher, and 2-rank ZeRO-2 distillation runs of the
digits config against a single-process torch loop, including the per-head evaluation.

Logit comparisons with timm: float32, atol 1e-5, rtol 1e-4, as in test_models (same ops, attention kernel
aside; a wrong token order or head moves logits by O(1)).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from distvit import models
from distvit.config import ConfigError, load_config
from distvit.engine.distill import Distiller, build_teacher, distillation_loss, named_logits, separate_heads
from distvit.models import load_checkpoint
from test_models import randomize_

TIMM_PARAM_COUNTS = {  # issue 10, plus the plain DeiTs (= ViT sizes)
    "deit_tiny_patch16_224": 5717416,
    "deit_small_patch16_224": 22050664,
    "deit_base_patch16_224": 86567656,
    "deit_small_distilled_patch16_224": 22436432,
    "deit_base_distilled_patch16_224": 87338192,
    "deit3_base_patch16_224": 86585320,
}
DEIT_FAMILY = [n for n in models.list_models("deit*") if n != "deit_digits_distilled"]
DIGITS_ARGS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                   mlp_ratio=2.0)
LOGIT_TOL = dict(atol=1e-5, rtol=1e-4)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def timm_twin(timm, name, **kwargs):
    if name == "deit_digits_distilled":
        from timm.models.deit import VisionTransformerDistilled

        return VisionTransformerDistilled(**{**DIGITS_ARGS, **kwargs})
    return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count_matches_the_issue_table(name):
    with torch.device("meta"):
        model = models.create(name)
    assert count(model) == TIMM_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", DEIT_FAMILY)
def test_param_count_and_layout_match_timm(name, timm_module):
    with torch.device("meta"):
        ours = models.create(name)
        theirs = timm_twin(timm_module, name)
    assert count(ours) == count(theirs)
    assert [k for k in ours.state_dict()] == [k for k in theirs.state_dict()]
    for key in ("input_size", "mean", "std"):
        assert ours.default_cfg[key] == tuple(theirs.pretrained_cfg[key]), key


@pytest.mark.parametrize("name,kwargs,img", [
    ("deit_small_distilled_patch16_224", dict(img_size=64, num_classes=7), 64),
    ("deit3_base_patch16_224", dict(img_size=48, depth=2), 48),
    ("deit_tiny_patch16_224", dict(img_size=32), 32),
    ("deit_digits_distilled", dict(drop_path_rate=0.0), 8),  # no drop path: train mode is compared too
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
        if hasattr(ours, "head_dist"):
            # Training with distillation: both heads separately, in timm's (cls, dist) order.
            ours.train().set_distilled_training(True)
            theirs.train().set_distilled_training(True)
            got, want = ours(x), theirs(x)
            assert isinstance(got, tuple) and len(got) == 2
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **LOGIT_TOL)
            ours.eval()
            with separate_heads(ours):  # evaluation of each head
                cls_logits, dist_logits = ours(x)
            torch.testing.assert_close((cls_logits + dist_logits) / 2, expected, **LOGIT_TOL)
            assert not ours.separate_heads and torch.is_tensor(ours(x))


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_checkpoint_at_another_img_size_matches_timm(timm_module, tmp_path, name):
    """224 weights into a 96 model: the position embedding (patch-only for DeiT III, two prefix tokens for
    the distilled DeiT) is resized as timm's checkpoint_filter_fn does; same logits."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter

    src = randomize_(timm_module.create_model(name, num_classes=5))
    path = tmp_path / "w224.safetensors"
    save_file(src.state_dict(), str(path))
    theirs = timm_module.create_model(name, num_classes=5, img_size=96).eval()
    theirs.load_state_dict(timm_filter(src.state_dict(), theirs, adapt_layer_scale=True), strict=True)
    ours = models.create(name, num_classes=5, img_size=96, checkpoint=str(path)).eval()
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed, atol=0, rtol=0)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **LOGIT_TOL)


def test_original_deit3_layer_scale_names_load(tmp_path):
    """Facebook's DeiT III files name layer scale `blocks.N.gamma_1/2`; they load as ls1/ls2.gamma."""
    src = randomize_(models.create("deit3_small_patch16_224", img_size=32, depth=2, num_classes=3))
    original = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
                for k, v in src.state_dict().items()}
    assert "blocks.0.gamma_1" in original
    path = tmp_path / "deit3.pth"
    torch.save({"model": original}, path)
    ours = models.create("deit3_small_patch16_224", img_size=32, depth=2, num_classes=3)
    assert load_checkpoint(ours, path).ok
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), src.eval()(x), atol=0, rtol=0)


def test_hooks_and_attributes():
    m = models.create("deit_small_distilled_patch16_224", img_size=64, num_classes=3)
    assert (m.num_prefix_tokens, m.pos_embed.shape) == (2, (1, 18, 384))
    assert m.no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}
    assert m.default_cfg["classifier"] == ("head", "head_dist")
    m.reset_classifier(4)
    assert m.head.out_features == m.head_dist.out_features == 4
    with pytest.raises(ValueError, match="global_pool='avg', class_token=True; the two heads read the class and"):
        models.create("deit_small_distilled_patch16_224", global_pool="avg")
    d3 = models.create("deit3_base_patch16_224", img_size=32, depth=1)
    assert d3.pos_embed.shape == (1, 4, 768) and d3.num_prefix_tokens == 1
    assert torch.equal(d3.blocks[0].ls1.gamma, torch.full((768,), 1e-6))


@pytest.mark.parametrize("name,kwargs,img", [
    ("deit_digits_distilled", {}, 8),
    ("deit3_small_patch16_224", dict(img_size=64, depth=2), 64),
])
def test_flops_per_image_matches_flop_counter(name, kwargs, img):
    m = models.create(name, attn_backend="math", **kwargs)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.randn(3, m.patch_embed.in_chans, img, img))
    assert counter.get_total_flops() == 3 * m.flops_per_image()


# --- the distillation losses ------------------------------------------------------------------------

CLS = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
DIST = [[1.0, 1.5, 0.0], [-0.5, 0.0, 2.0]]
TEACHER = [[0.2, 3.0, 0.1], [1.0, 0.0, -1.0]]  # argmax: 1, 0
LABELS = [0, 2]


def _log_softmax(row, tau=1.0):
    z = [v / tau for v in row]
    lse = math.log(sum(math.exp(v) for v in z))
    return [v - lse for v in z]


def _ce(row, label, smoothing=0.0):
    logp = _log_softmax(row)
    return -(1 - smoothing) * logp[label] - smoothing * sum(logp) / len(row)


def _kl(teacher_row, student_row, tau):
    lt, ls = _log_softmax(teacher_row, tau), _log_softmax(student_row, tau)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("alpha,smoothing", [(0.5, 0.0), (0.3, 0.1)])
def test_hard_distillation_loss_equals_hand_computed(alpha, smoothing):
    base = sum(_ce(r, y, smoothing) for r, y in zip(CLS, LABELS)) / 2
    hard = (_ce(DIST[0], 1) + _ce(DIST[1], 0)) / 2  # the teacher's argmax labels, no smoothing
    want = (1 - alpha) * base + alpha * hard
    got = distillation_loss(_t(CLS), _t(DIST), _t(TEACHER), torch.tensor(LABELS), kind="hard", alpha=alpha, tau=1.0,
                            label_smoothing=smoothing)
    assert got.item() == pytest.approx(want, rel=1e-6)  # float32 vs Python doubles


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_loss_equals_hand_computed(tau):
    alpha = 0.4
    base = sum(_ce(r, y) for r, y in zip(CLS, LABELS)) / 2
    soft = sum(_kl(t, s, tau) for t, s in zip(TEACHER, DIST)) / 2 * tau * tau  # summed over classes, batch mean
    want = (1 - alpha) * base + alpha * soft
    got = distillation_loss(_t(CLS), _t(DIST), _t(TEACHER), torch.tensor(LABELS), kind="soft", alpha=alpha, tau=tau)
    assert got.item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="kind='medium'; choose 'hard' or 'soft'"):
        distillation_loss(_t(CLS), _t(DIST), _t(TEACHER), torch.tensor(LABELS), kind="medium", alpha=0.5, tau=1.0)


def test_student_without_distillation_head_distills_its_class_head():
    teacher = torch.nn.Linear(4, 3)
    d = Distiller(teacher.eval().requires_grad_(False), kind="hard", alpha=0.5, tau=1.0)
    images = torch.randn(2, 4)
    loss = d.loss(images, _t(CLS), torch.tensor(LABELS))
    want = distillation_loss(_t(CLS), _t(CLS), teacher(images), torch.tensor(LABELS), kind="hard", alpha=0.5, tau=1.0)
    assert torch.equal(loss, want)


def test_named_logits_reports_three_heads_for_a_pair():
    heads = named_logits((_t(CLS), _t(DIST)))
    assert list(heads) == ["", "_cls", "_dist"]
    torch.testing.assert_close(heads[""], (_t(CLS) + _t(DIST)) / 2)
    assert list(named_logits(_t(CLS))) == [""]


# --- the teacher ------------------------------------------------------------------------------------


def test_teacher_is_frozen_in_eval_mode_and_in_the_students_precision(tmp_path):
    from safetensors.torch import save_file

    src = randomize_(models.create("vit_digits"))
    path = tmp_path / "teacher.safetensors"
    save_file(src.state_dict(), str(path))
    teacher = build_teacher("vit_digits", str(path), num_classes=10, img_size=8, in_chans=1,
                            device=torch.device("cpu"), dtype=torch.bfloat16)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert torch.equal(teacher.head.weight, src.head.weight.bfloat16())
    d = Distiller(teacher, kind="soft", alpha=0.5, tau=2.0)
    teacher.train()  # a caller flipping modes must not turn on the teacher's drop path
    x = torch.randn(4, 1, 8, 8).bfloat16()
    assert torch.equal(d.teacher_logits(x), d.teacher_logits(x))
    assert d.teacher_logits(x).dtype == torch.float32

    with pytest.raises(ConfigError, match=r"distill.teacher_checkpoint='.*teacher.safetensors' does not fit "
                                          r"distill.teacher='vit_digits' built for 7 classes"):
        build_teacher("vit_digits", str(path), num_classes=7, img_size=8, in_chans=1, device=torch.device("cpu"),
                      dtype=torch.float32)
    with pytest.raises(ConfigError, match="distill.teacher_checkpoint='nowhere.safetensors': the file does not exist"):
        build_teacher("vit_digits", "nowhere.safetensors", num_classes=10, img_size=8, in_chans=1,
                      device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="distill.teacher='vit_digit': unknown model 'vit_digit'; did you mean"):
        build_teacher("vit_digit", str(path), num_classes=10, img_size=8, in_chans=1, device=torch.device("cpu"),
                      dtype=torch.float32)


def test_distill_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="distill.kind=soft needs a teacher model and its weights, but "
                                          "distill.teacher_checkpoint is not set"):
        load_config("deit_digits_distill", ["distill.kind=soft", "distill.teacher_checkpoint=null"])
    with pytest.raises(ConfigError, match=r"distill.tau must be > 0, got 0.0"):
        load_config("deit_digits_distill", ["distill.tau=0"])
    cfg = load_config("deit_digits_distill")
    assert (cfg.distill.kind, cfg.distill.teacher, cfg.model.name) == ("hard", "vit_digits", "deit_digits_distilled")
    cfg = load_config("deit_small_distill_imagenet")
    assert (cfg.distill.kind, cfg.model.name) == ("hard", "deit_small_distilled_patch16_224")
    assert models.is_model(cfg.distill.teacher)


# --- training through the Trainer -------------------------------------------------------------------


def distill_reference_run(cfg, teacher, steps: int, dp_size: int = 2):
    """Plain torch, one process: AdamW on the global batch, the DeiT loss written out here (not distill.py)."""
    from distvit.data import build_train_loader
    from distvit.engine.optim import param_groups
    from distvit.engine.schedule import build_scheduler
    from distvit.engine.build import build_model, seed_all

    seed_all(cfg.run.seed)
    model = build_model(cfg)
    model.set_distilled_training(True)
    o, a = cfg.optim, cfg.distill.alpha
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, foreach=False)
    sched = build_scheduler(opt, total_steps=steps, warmup_steps=cfg.schedule.warmup_steps, kind=cfg.schedule.kind,
                            peak_lr=o.lr, min_lr=cfg.schedule.min_lr)
    iters = []
    for r in range(dp_size):
        loader = build_train_loader(cfg.data, dp_rank=r, dp_size=dp_size, seed=cfg.run.seed)
        loader.set_epoch(0)
        iters.append(iter(loader))
    step_losses = []
    for _ in range(steps):
        xs, ys = zip(*(next(it) for it in iters))
        # Each rank's loss is a mean over its half of the batch; DeepSpeed averages the two, as this mean does.
        losses = []
        for xr, yr in zip(xs, ys):
            cls_logits, dist_logits = model(xr)
            with torch.no_grad():
                teacher_labels = teacher(xr).argmax(-1)
            losses.append((1 - a) * F.cross_entropy(cls_logits, yr) + a * F.cross_entropy(dist_logits, teacher_labels))
        loss = sum(losses) / len(losses)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_losses.append(loss.item())
    return model, step_losses


@pytest.mark.multirank
def test_hard_distillation_zero2_two_ranks_equal_single_process(tmp_path):
    """configs/deit_digits_distill.yaml on 2 ranks, ZeRO-2, 5 steps == the torch loop above; the final
    evaluation of the averaged, class-token and distillation-token heads matches the exported weights'."""
    from safetensors.torch import save_file

    from distvit.data import build_val_loader
    from distvit.data.write import write_digits
    from trainer_helpers import launch, load_weights, losses, summary

    steps = 5
    digits = tmp_path / "digits"
    write_digits(digits)
    torch.manual_seed(123)
    teacher = randomize_(models.create("vit_digits"), seed=3).eval()
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    sets = [f"run.output_dir={tmp_path}", "run.name=deit", f"run.max_steps={steps}", "run.eval_every=1000",
            f"data.train={digits}/train-*.tar", f"data.val={digits}/val-*.tar", "data.batch_size=16",
            "log.every_steps=1", "log.tensorboard=false", "log.progress=false", "schedule.warmup_steps=2",
            "optim.lr=3e-3", "parallel.zero_stage=2", "model.drop_path_rate=0.0",
            f"distill.teacher_checkpoint={tmp_path}/teacher.safetensors"]
    proc = launch(["--config", "deit_digits_distill"] + [a for s in sets for a in ("--set", s)])
    assert "distillation: hard from teacher vit_digits" in proc.stdout
    cfg = load_config("deit_digits_distill", sets)
    ref_model, ref_losses = distill_reference_run(cfg, teacher, steps)
    got = load_weights(tmp_path / "deit" / "model.safetensors")
    ref_state = ref_model.state_dict()
    assert set(got) == set(ref_state)
    # Tolerances as in test_trainer (fp32, all-reduced half-batch grads vs one sum, Adam over 5 steps).
    for k, ref in ref_state.items():
        torch.testing.assert_close(got[k], ref.float(), rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    logged = [float(loss) for _, loss in losses(tmp_path / "deit")]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)

    # The run's final evaluation of each head, recomputed from its exported weights on one process.
    student = models.create("deit_digits_distilled", checkpoint=str(tmp_path / "deit" / "model.safetensors")).eval()
    totals = {head: torch.zeros(2, dtype=torch.float64) for head in ("", "_cls", "_dist")}  # loss sum, hits
    n = 0
    with torch.no_grad(), separate_heads(student):
        for images, labels, valid in build_val_loader(cfg.data, dp_rank=0, dp_size=1):
            for head, logits in named_logits(student(images)).items():
                loss = (F.cross_entropy(logits, labels, reduction="none") * valid).sum()
                totals[head] += torch.stack([loss, ((logits.argmax(-1) == labels) & valid).sum()]).double()
            n += int(valid.sum())
    s = summary(tmp_path / "deit")
    for head in ("_cls", "_dist"):
        # Same weights, other batch shapes: the mean loss agrees to float32 rounding (rtol 1e-5) ...
        assert s[f"final_loss{head}"] == pytest.approx(totals[head][0].item() / n, rel=1e-5), head
    assert s["final_loss_cls"] != pytest.approx(s["final_loss_dist"], rel=1e-3)  # two different heads
    for head, key in (("", "final_top1"), ("_cls", "final_top1_cls"), ("_dist", "final_top1_dist")):
        # ... and top-1 exactly, unless a near-tie flips one sample.
        assert abs(s[key] - 100 * totals[head][1].item() / n) <= 100 / n + 1e-9, key
