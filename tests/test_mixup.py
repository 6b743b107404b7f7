"""Mixup / CutMix (distvit/data/mixup.py) against timm's Mixup, by hand, and the loss (distvit/engine/loss.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distvit.data.config import DataConfig
from distvit.data.mixup import Mixup, build_mixer
from distvit.engine.loss import cross_entropy

CASES = [  # mixup alpha, cutmix alpha, prob, switch prob, mode
    (0.8, 1.0, 1.0, 0.5, "batch"), (0.8, 0.0, 1.0, 0.5, "batch"), (0.0, 1.0, 1.0, 0.5, "batch"),
    (0.8, 1.0, 0.6, 0.5, "batch"), (0.8, 1.0, 0.8, 0.5, "pair"), (0.8, 1.0, 0.8, 0.3, "elem"), (0.0, 1.0, 1.0, 0.5, "elem"),
]


@pytest.mark.parametrize("mixup,cutmix,prob,switch,mode", CASES)
def test_same_draws_same_mix_as_timm(timm_module, mixup, cutmix, prob, switch, mode):
    from timm.data.mixup import Mixup as TimmMixup

    x = torch.randn(8, 3, 12, 10)
    y = torch.randint(0, 5, (8,))
    kw = dict(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch, mode=mode,
              label_smoothing=0.1, num_classes=5)
    mixed = 0
    for seed in range(12):
        np.random.seed(seed)
        tx, ty = TimmMixup(**kw)(x.clone(), y.clone())
        ox, oy = Mixup(**kw)(x.clone(), y.clone(), np.random.RandomState(seed))
        torch.testing.assert_close(ox, tx, rtol=0, atol=0)
        torch.testing.assert_close(oy, ty.float(), rtol=1e-6, atol=1e-7)
        mixed += not torch.equal(ox, x)
    assert mixed >= 6


def test_batch_mixup_by_hand():
    x = torch.arange(4 * 1 * 2 * 2, dtype=torch.float32).view(4, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    rs = np.random.RandomState(3)
    rs.rand()  # the "apply?" draw (prob 1: always applies)
    lam = float(rs.beta(0.5, 0.5))
    ox, oy = Mixup(0.5, 0.0, label_smoothing=0.0, num_classes=3)(x.clone(), y, np.random.RandomState(3))
    torch.testing.assert_close(ox, lam * x + (1 - lam) * x.flip(0))
    expected = torch.tensor([[lam + 1 - lam, 0, 0], [0, lam, 1 - lam], [0, 1 - lam, lam], [1, 0, 0]])
    torch.testing.assert_close(oy, expected)


def test_cutmix_box_and_corrected_lam_by_hand():
    x = torch.zeros(2, 1, 10, 10)
    x[1] = 1.0
    rs = np.random.RandomState(0)
    rs.rand()
    lam = rs.beta(1.0, 1.0)
    cut = int(10 * np.sqrt(1 - lam))
    cy, cx = rs.randint(0, 10), rs.randint(0, 10)
    yl, yh = np.clip(cy - cut // 2, 0, 10), np.clip(cy + (cut + 1) // 2, 0, 10)
    xl, xh = np.clip(cx - cut // 2, 0, 10), np.clip(cx + (cut + 1) // 2, 0, 10)
    ox, oy = Mixup(0.0, 1.0, label_smoothing=0.0, num_classes=2)(x.clone(), torch.tensor([0, 1]), np.random.RandomState(0))
    box = torch.zeros(10, 10)
    box[yl:yh, xl:xh] = 1
    assert torch.equal(ox[0, 0], box) and torch.equal(ox[1, 0], 1 - box)
    area = box.sum().item() / 100  # lam is the share of the image left unpasted, after clipping
    torch.testing.assert_close(oy[0], torch.tensor([1 - area, area]))


def test_draws_are_per_step_micro_batch_and_dp_rank():
    r = lambda *a: Mixup.draws(*a).rand()  # noqa: E731
    assert r(0, 5, 1, 0) == r(0, 5, 1, 0)  # same key (e.g. the sp ranks of one dp rank, or a resumed run)
    values = {r(0, 5, 1, 0), r(0, 5, 0, 0), r(0, 6, 1, 0), r(0, 5, 1, 1), r(1, 5, 1, 0)}
    assert len(values) == 5


def test_loss_hard_equals_torch_and_soft_with_smoothing_equals_timm(timm_module):
    from timm.data.mixup import Mixup as TimmMixup
    from timm.loss import SoftTargetCrossEntropy

    logits = torch.randn(6, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (6,))
    torch.testing.assert_close(cross_entropy(logits, y, 0.1), F.cross_entropy(logits.float(), y, label_smoothing=0.1))
    x = torch.randn(6, 3, 4, 4)
    np.random.seed(1)
    _, timm_targets = TimmMixup(0.8, 1.0, label_smoothing=0.1, num_classes=7)(x.clone(), y)
    # ours: mix without smoothing, smooth in the loss (what the trainer does; identical by linearity)
    _, soft = Mixup(0.8, 1.0, label_smoothing=0.0, num_classes=7)(x.clone(), y, np.random.RandomState(1))
    expected = SoftTargetCrossEntropy()(logits.float(), timm_targets)
    torch.testing.assert_close(cross_entropy(logits, soft, label_smoothing=0.1), expected)
    # and a soft target that is one-hot is the hard loss
    torch.testing.assert_close(cross_entropy(logits, F.one_hot(y, 7).float(), 0.1), cross_entropy(logits, y, 0.1))


def test_config_checks():
    assert build_mixer(DataConfig(), 10) is None
    assert build_mixer(DataConfig(mixup=0.8, cutmix=1.0, batch_size=8), 10).num_classes == 10
    with pytest.raises(ValueError, match=r"data.batch_size=7 is odd.*set data.batch_size=8"):
        DataConfig(mixup=0.8, batch_size=7)
    with pytest.raises(ValueError, match=r"cutmix\s+Value error, must be >= 0 \(a Beta alpha.*got -1"):
        DataConfig(cutmix=-1)


def test_distillation_loss_takes_mixed_soft_targets():
    """The trainer hands the distiller mixup's soft targets: its label term is then the soft-target loss."""
    from distvit.engine.distill import distillation_loss

    logits, teacher = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    _, soft = Mixup(0.8, 0.0, label_smoothing=0.0, num_classes=5)(torch.randn(4, 1, 2, 2), y, np.random.RandomState(2))
    got = distillation_loss(logits, logits, teacher, soft, kind="hard", alpha=0.3, tau=1.0, label_smoothing=0.1)
    expected = 0.7 * cross_entropy(logits, soft, 0.1) + 0.3 * F.cross_entropy(logits, teacher.argmax(-1))
    torch.testing.assert_close(got, expected)
