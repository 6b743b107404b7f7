"""The trainer's side of native-resolution training (data.packing): checks, and counting real work.

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

from distvit.config import Config, ConfigError
from distvit.models.packed import grid_flops


def patch_size(model: torch.nn.Module):
    """The model's patch size (what the packed loaders cut images into), None for models without one."""
    pe = getattr(model, "patch_embed", None)
    return getattr(pe, "patch_size", None)


def check(cfg: Config, model: torch.nn.Module) -> None:
    """data.packing needs a model with forward_packed: the ViT family (square-batch augmentations are
    refused by the data config itself)."""
    if cfg.data.packing is None:
        return
    if not hasattr(model, "forward_packed"):
        raise ConfigError(f"data.packing needs a model with a packed forward (the ViT/DeiT family); "
                          f"model.name={cfg.model.name!r} has none; pick a ViT or set data.packing=null")


def check_teacher(cfg: Config, teacher: torch.nn.Module | None) -> None:
    if cfg.data.packing is not None and teacher is not None and not hasattr(teacher, "forward_packed"):
        raise ConfigError(f"data.packing: the teacher distill.teacher={cfg.distill.teacher!r} has no packed forward "
                          "(it must see the student's packed batch); pick a ViT/DeiT teacher or set data.packing=null")


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
