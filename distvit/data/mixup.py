"""Mixup / CutMix on a batch, timm's `Mixup` with an explicit generator.

    mixer = build_mixer(cfg.data, num_classes)           # None when data.mixup = data.cutmix = 0
    images, targets = mixer(images, labels, mixer.draws(seed, step, micro, dp_rank))

The numerics are timm's (timm/data/mixup.py): per batch / pair / element, lam ~ Beta(alpha, alpha),
CutMix's box from `rand_bbox` with lam corrected to the box's clipped area, each sample mixed with
the batch flipped (sample i with B-1-i), targets `lam * y + (1 - lam) * y.flip(0)` of one-hot
labels smoothed by `label_smoothing`. What differs is the random source: timm draws from the
global numpy state; here every draw comes from a `numpy.random.RandomState` seeded by (run seed,
optimizer step, micro-batch, dp rank), so that
- the sequence-parallel ranks of one dp rank (same images) make the same mix,
- each micro-batch of a gradient-accumulation step gets its own mix,
- a resumed run mixes exactly as the uninterrupted one (the step is in the checkpoint),
- nothing else (model init, dropout) is shifted by mixup's draws.
A test seeds numpy's global state and our generator identically and compares with timm's Mixup.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def one_hot_smoothed(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((target.shape[0], num_classes), off, device=target.device).scatter_(
        1, target.long().view(-1, 1), 1.0 - smoothing + off)


def mixup_target(target: torch.Tensor, num_classes: int, lam, smoothing: float = 0.0) -> torch.Tensor:
    y = one_hot_smoothed(target, num_classes, smoothing)
    return y * lam + y.flip(0) * (1.0 - lam)


def rand_bbox(shape, lam: float, rs: np.random.RandomState):
    ratio = np.sqrt(1 - lam)
    h, w = shape[-2:]
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = rs.randint(0, h), rs.randint(0, w)
    yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
    xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
    return yl, yh, xl, xh


def cutmix_bbox_and_lam(shape, lam: float, rs: np.random.RandomState, correct_lam: bool = True):
    yl, yh, xl, xh = rand_bbox(shape, lam, rs)
    if correct_lam:
        lam = 1.0 - (yh - yl) * (xh - xl) / float(shape[-2] * shape[-1])
    return (yl, yh, xl, xh), lam


class Mixup:
    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", correct_lam: bool = True,
                 label_smoothing: float = 0.1, num_classes: int = 1000):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("Mixup needs data.mixup > 0 or data.cutmix > 0")
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob = mixup_alpha, cutmix_alpha, prob, switch_prob
        self.mode, self.correct_lam, self.label_smoothing, self.num_classes = mode, correct_lam, label_smoothing, num_classes

    @staticmethod
    def draws(seed: int, step: int, micro: int, dp_rank: int) -> np.random.RandomState:
        digest = hashlib.blake2b(f"mixup\0{seed}\0{step}\0{micro}\0{dp_rank}".encode(), digest_size=4).digest()
        return np.random.RandomState(int.from_bytes(digest, "little"))

    def _lam_mix(self, rs, use_cutmix, size=None):
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            if size is None:
                return rs.beta(self.cutmix_alpha, self.cutmix_alpha) if use_cutmix else rs.beta(self.mixup_alpha, self.mixup_alpha)
            return np.where(use_cutmix, rs.beta(self.cutmix_alpha, self.cutmix_alpha, size=size),
                            rs.beta(self.mixup_alpha, self.mixup_alpha, size=size))
        alpha = self.mixup_alpha if self.mixup_alpha > 0 else self.cutmix_alpha
        return rs.beta(alpha, alpha, size=size)

    def _params_per_elem(self, n: int, rs):
        lam = np.ones(n, dtype=np.float32)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rs.rand(n) < self.switch_prob
        else:
            use_cutmix = np.full(n, self.mixup_alpha <= 0, dtype=bool)
        lam_mix = self._lam_mix(rs, use_cutmix, size=n)
        lam = np.where(rs.rand(n) < self.prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    def _params_per_batch(self, rs):
        if rs.rand() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rs.rand() < self.switch_prob
        else:
            use_cutmix = self.mixup_alpha <= 0
        return float(self._lam_mix(rs, use_cutmix)), use_cutmix

    def _mix_each(self, x, rs, pair: bool):
        b = len(x)
        n = b // 2 if pair else b
        lam_batch, use_cutmix = self._params_per_elem(n, rs)
        x_orig = x.clone()
        for i in range(n):
            j = b - i - 1
            lam = lam_batch[i]
            if lam == 1.0:
                continue
            if use_cutmix[i]:
                (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(x[i].shape, lam, rs, self.correct_lam)
                x[i][:, yl:yh, xl:xh] = x_orig[j][:, yl:yh, xl:xh]
                if pair:
                    x[j][:, yl:yh, xl:xh] = x_orig[i][:, yl:yh, xl:xh]
                lam_batch[i] = lam
            else:
                x[i] = x[i] * lam + x_orig[j] * (1 - lam)
                if pair:
                    x[j] = x[j] * lam + x_orig[i] * (1 - lam)
        if pair:
            lam_batch = np.concatenate((lam_batch, lam_batch[::-1]))
        return torch.tensor(lam_batch, device=x.device, dtype=x.dtype).unsqueeze(1)

    def _mix_batch(self, x, rs):
        lam, use_cutmix = self._params_per_batch(rs)
        if lam == 1.0:
            return 1.0
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(x.shape, lam, rs, self.correct_lam)
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
        return lam

    def __call__(self, x: torch.Tensor, target: torch.Tensor, rs: np.random.RandomState):
        """Mixes x in place; returns (x, soft targets [B, num_classes] in float32)."""
        if len(x) % 2:
            raise ValueError(f"mixup/cutmix needs an even batch, got {len(x)}; set data.batch_size to an even number")
        lam = self._mix_batch(x, rs) if self.mode == "batch" else self._mix_each(x, rs, pair=self.mode == "pair")
        if isinstance(lam, torch.Tensor):
            lam = lam.float()
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)


def build_mixer(data_cfg, num_classes: int, label_smoothing: float = 0.0) -> Mixup | None:
    """The run's Mixup, or None. The trainer keeps label_smoothing=0 here and smooths in the loss
    (distvit.engine.loss.cross_entropy): the same targets, so a distillation loss smooths them once."""
    if data_cfg.mixup <= 0 and data_cfg.cutmix <= 0:
        return None
    return Mixup(data_cfg.mixup, data_cfg.cutmix, data_cfg.mixup_prob, data_cfg.mixup_switch_prob,
                 data_cfg.mixup_mode, label_smoothing=label_smoothing, num_classes=num_classes)
