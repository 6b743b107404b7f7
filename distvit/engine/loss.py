"""Classification loss: cross-entropy with hard (class index) or soft (mixup / cutmix) targets and
label smoothing, computed in float32.

    loss = cross_entropy(logits, targets, label_smoothing=0.1)

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
