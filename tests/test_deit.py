"""DeiT, distilled DeiT and DeiT III beyond the model contract (tests/test_model_contract.py: sizes, timm
layout and logits, weight round trips, position-embedding resizing, checkpointing, FLOPs, backends): the
two heads against timm's, DeiT III's original weight names, hooks, the distillation losses against
hand-computed values, the teacher, and a 2-rank ZeRO-2 distillation run of the digits config against the
single-process reference loop, including the per-head evaluation.

Logit tolerances: tests/model_helpers.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distvit import models
from distvit.config import ConfigError, load_config
from distvit.engine.distill import Distiller, build_teacher, distillation_loss, named_logits, separate_heads
from distvit.models import load_checkpoint
from model_helpers import LOGIT_TOL, randomize_, timm_twin


@pytest.mark.parametrize("name,kwargs,img", [
    ("deit_small_distilled_patch16_224", dict(img_size=64, num_classes=7), 64),
    ("deit_digits_distilled", dict(drop_path_rate=0.0), 8),  # no drop path: train mode is compared
])
def test_distilled_heads_equal_timms_in_training_and_apart_in_eval(timm_module, name, kwargs, img):
    """The averaged eval logits are the contract's (test_model_contract); here the two heads: in training with
    distillation both come back in timm's (cls, dist) order, and separate_heads gives each in eval mode."""
    theirs = randomize_(timm_twin(timm_module, name, **kwargs)).eval()
    ours = models.create(name, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, ours.patch_embed.in_chans, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(x)
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


@pytest.mark.multirank
def test_hard_distillation_zero2_two_ranks_equal_single_process(tmp_path):
    """configs/deit_digits_distill.yaml on 2 ranks, ZeRO-2, 5 steps == trainer_helpers.reference_run with the
    teacher (hard distillation on each rank's half of the batch, the two halves' losses averaged); the final
    evaluation of the averaged, class-token and distillation-token heads matches the exported weights'."""
    from safetensors.torch import save_file

    from distvit.data import build_val_loader
    from distvit.data.write import write_digits
    from trainer_helpers import launch, load_weights, losses, reference_run, summary

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
    ref_state, ref_losses = reference_run(cfg, steps, teacher=teacher)
    got = load_weights(tmp_path / "deit" / "model.safetensors")
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
