"""The autoregressive task (task.kind=autoregressive): AIM-style next-patch pixel regression.

    task = NextPatch.from_config(cfg)          # None for task.kind=classify
    model = task.build_model(cfg)              # a vit_causal_* model with the task's prefix
    loss = task.loss(engine(images), images)   # predictions (B, N, patch_dim) -> scalar
    row = task.evaluate(model, val_loader, device, dtype, dp_group)  # {"val_loss", "val_mse", ...}

Objective (AIM, El-Nouby et al. 2024): the causal ViT predicts patch i from patches 0 .. i-1;
the target is each patch's pixels, normalised by the patch's own mean and variance when
task.norm_pix (as AIM and MAE do: the loss then weighs texture, not brightness); with
task.prefix_patches = K the first K patches attend both ways and carry no loss, so the loss is
the mean squared error over patches K .. N-1 only. The arithmetic (normalise_patches,
next_patch_errors) is distvit/models/causal_vit.py's, which CausalViT.loss uses too: one objective.

Sequence parallelism: the model's tokens are split over sp ranks by parallel/parallelize_causal.py
(through parallel.engine.apply_sequence_parallel; ring: zig-zag layout, so every rank does the same causal work; ulysses: contiguous); its forward
returns the gathered predictions on every rank with the replicated-result backward, so the loss
here is computed as in one process and DeepSpeed sums the partial gradients over sp.
"""
from __future__ import annotations

import torch

from distvit import models
from distvit.config import Config, ConfigError
# The objective's arithmetic lives beside the model (pure torch), so that CausalViT.loss and this task are one
# implementation: per-patch normalised targets and the MSE over the non-prefix patches.
from distvit.models.causal_vit import NORM_EPS, next_patch_errors, normalise_patches  # noqa: F401 (re-exported)
from distvit.parallel import comm


class NextPatch:
    """Next-patch regression: loss, evaluation and the model it trains (see the module doc)."""

    def __init__(self, prefix_patches: int = 0, norm_pix: bool = True):
        self.prefix_patches = prefix_patches
        self.norm_pix = norm_pix

    @classmethod
    def from_config(cls, cfg: Config) -> "NextPatch | None":
        if cfg.task.kind != "autoregressive":
            return None
        return cls(cfg.task.prefix_patches, cfg.task.norm_pix)

    def build_model(self, cfg: Config) -> torch.nn.Module:
        overrides = dict(img_size=cfg.model.img_size or cfg.data.img_size, in_chans=cfg.model.in_chans or cfg.data.in_chans,
                         drop_path_rate=cfg.model.drop_path_rate, attn_backend=cfg.model.attn_backend,
                         prefix_patches=self.prefix_patches)
        try:
            return models.create(cfg.model.name, checkpoint=cfg.model.checkpoint, **overrides)
        except ValueError as exc:
            if "prefix_patches" in str(exc):  # more prefix than the image has patches: a config error, one line
                raise ConfigError(str(exc)) from None
            raise

    def targets(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        patches = model.patchify(images)
        return normalise_patches(patches) if self.norm_pix else patches

    def errors(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image mean squared error over the predicted (non-prefix) patches: (B,), float32."""
        return next_patch_errors(pred, target, self.prefix_patches)

    def loss(self, pred: torch.Tensor, images: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        return self.errors(pred, self.targets(model, images)).mean()

    def tokens_per_image(self, model: torch.nn.Module) -> int:
        return model.num_patches

    @torch.no_grad()
    def evaluate(self, model, net, val_loader, device, dtype, dp_group, batches) -> dict:
        """Held-out next-patch MSE (teacher forcing), exact over the val set: padded samples are masked.

        model: what runs the forward (the engine or an EMA copy); net: the bare module (patchify).
        batches: an iterator over val_loader that leaves the global RNG alone (trainer._rng_isolated).
        """
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # error sum, count
        for images, _labels, valid in batches:
            images = images.to(device, dtype=dtype)
            valid = valid.to(device)
            err = self.errors(model(images), self.targets(net, images))
            totals += torch.stack([(err * valid).sum(), valid.sum()]).double()
        err_sum, count = comm.all_reduce(totals, "sum", dp_group).tolist()
        mse = err_sum / max(count, 1.0)
        return {"val_loss": mse, "val_mse": mse, "val_count": int(count)}
