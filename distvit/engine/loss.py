"""Classification losses, computed in float32: cross-entropy with hard (class index) or soft (mixup /
cutmix) targets and label smoothing, and DeiT's distillation loss.

    loss = cross_entropy(logits, targets, label_smoothing=0.1)
    loss = distillation_loss(cls_logits, dist_logits, teacher_logits, labels, kind="hard", alpha=0.5, tau=1.0)

For targets t (one-hot for hard labels, a distribution for soft ones) over C classes and smoothing
e, the target is t' = (1 - e) t + e / C and the loss is mean over the batch of -sum_c t'_c log
softmax(z)_c. For hard labels that is torch's `F.cross_entropy(..., label_smoothing=e)` (timm's
LabelSmoothingCrossEntropy); for soft targets made by mixup *without* smoothing it equals timm's
SoftTargetCrossEntropy on the targets its Mixup makes *with* smoothing e, because smoothing is
linear: lam ((1-e) y1 + e/C) + (1-lam) ((1-e) y2 + e/C) = (1-e) (lam y1 + (1-lam) y2) + e/C.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    logits = logits.float()
    if not targets.is_floating_point():
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if targets.shape != logits.shape:
        raise ValueError(f"soft targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    t = targets.float()
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    return torch.sum(-t * F.log_softmax(logits, dim=-1), dim=-1).mean()


def distillation_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, *, kind: str, alpha: float, tau: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """The DeiT objective (Touvron et al. 2021); all logits (batch, classes), computed in float32.

        hard: (1 - alpha) * CE(z_cls, y) + alpha * CE(z_dist, argmax z_t)
        soft: (1 - alpha) * CE(z_cls, y) + alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_dist / tau))

    label_smoothing applies to CE on the labels only (as DeiT); KL is summed over classes and
    averaged over the batch. The teacher and the student's heads: distvit/engine/distill.py.
    """
    base = F.cross_entropy(cls_logits.float(), labels, label_smoothing=label_smoothing)
    if kind == "hard":
        term = F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1))
    elif kind == "soft":
        log_p_student = F.log_softmax(dist_logits.float() / tau, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
        term = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau * tau
    else:
        raise ValueError(f"distillation_loss: kind={kind!r}; choose 'hard' or 'soft'")
    return (1.0 - alpha) * base + alpha * term
