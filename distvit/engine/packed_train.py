"""The trainer's side of native-resolution training (data.packing): counting real work (checks: config/checks.py).

With data.packing the loaders yield distvit.data.packing.PackedBatch micro-batches; the trainer
passes them to the engine as it passes image tensors (`engine(packed)`: VisionTransformer.forward
hands a PackedBatch to forward_packed, through the module call so that DeepSpeed's hooks, ZeRO-3's
parameter gathering included, run as for images). The teacher of distillation gets the same packed
batch. What differs is counting: a packed step holds a varying number of images of varying sizes, so
the loss is weighted to the mean over the step's images on all ranks (`weighted`), and img/s and
FLOPs (MFU) come from the images of the step on every dp rank (`step_grids`, from the loader's
global plan), counting real tokens only (models/packed.py `grid_flops`).
"""
from __future__ import annotations

import torch

from distvit.config import Config
# The packing rules live in the config (config/checks.py); resolve() runs them before start-up, on the
# model classes. These names check a built model, for callers that build their own.
from distvit.config.checks import check_packed_student as check, check_packed_teacher as check_teacher  # noqa: F401
from distvit.models.packed import grid_flops


def patch_size(model: torch.nn.Module):
    """The model's patch size (what the packed loaders cut images into), None for models without one."""
    pe = getattr(model, "patch_embed", None)
    return getattr(pe, "patch_size", None)


def step_counts(images, labels: torch.Tensor, dp_size: int, model, flops_per_image: float | None):
    """(images, forward FLOPs) of this micro-batch over all dp ranks; FLOPs None when not known."""
    grids = getattr(images, "step_grids", None)
    if grids is not None:  # packed: the plan's images of every rank, real tokens only
        return int(grids.shape[0]), float(grid_flops(model, grids))
    n = int(labels.shape[0]) * dp_size
    return n, (flops_per_image * n if flops_per_image else None)


def weighted(loss: torch.Tensor, images, labels: torch.Tensor, dp_size: int) -> torch.Tensor:
    """A packed micro-batch's mean loss times n_local * dp / N (N: the step's images on all dp ranks).

    Ranks hold different image counts; DeepSpeed averages gradients over dp, so unweighted per-rank
    means would weigh an image on a rank with few images more. Weighted, the dp average is the mean
    over all N images of the step, as one process would compute it (NaViT). Square batches: as is."""
    grids = getattr(images, "step_grids", None)
    if grids is None or dp_size == 1:
        return loss
    return loss * (labels.shape[0] * dp_size / grids.shape[0])


def describe(cfg: Config) -> str | None:
    p = cfg.data.packing
    if p is None:
        return None
    return (f"  data.packing: {cfg.data.batch_size} sequences x {p.max_tokens} patches per micro-batch, images "
            f"{p.resize} with sides {p.min_side}..{p.max_side} px; img/s and TFLOPs count real tokens")
