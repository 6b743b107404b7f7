"""uint8 batches -> normalised float batches on the training device (timm's prefetch loader, in effect).

Workers only decode, crop and augment (PIL, uint8): a batch crosses worker shared memory and the
host-to-device copy as uint8 [B, C, H, W], a quarter of float32's bytes. Here, in the process that
trains, it is copied (pinned, non-blocking on CUDA), normalised as (x / 255 - mean) / std with one
fused multiply-subtract, and random erasing is applied to the normalised batch from the boxes and
noise seeds each sample's own generator drew in the worker (`ERASE_COLUMNS`), so the result equals
the former worker-side float pipeline and resume stays bitwise.
"""
from __future__ import annotations

import numpy as np
import torch

ERASE_COLUMNS = ("top", "left", "height", "width", "seed")  # height 0: not erased


def to_uint8_batch(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC (or HW) images -> one contiguous uint8 [B, C, H, W] tensor."""
    batch = torch.from_numpy(np.stack(images))
    if batch.dim() == 3:  # grayscale: add the channel axis
        batch = batch.unsqueeze(-1)
    return batch.permute(0, 3, 1, 2).contiguous()


class DeviceNormalize:
    """uint8 [B, C, H, W] on any device -> float32 (x / 255 - mean) / std on `device`, then erasing."""

    def __init__(self, mean, std, erase_mode: str = "pixel"):
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, -1, 1, 1)
        self.erase_mode = erase_mode
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            self._consts[device] = (self.scale.to(device), self.shift.to(device))
        return self._consts[device]

    def __call__(self, images: torch.Tensor, device=None, erase: torch.Tensor | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize takes uint8 batches, got {images.dtype}")
        device = torch.device(device) if device is not None else images.device
        if device.type == "cuda" and images.device.type == "cpu":
            if not images.is_pinned():
                images = images.pin_memory()
            images = images.to(device, non_blocking=True)
        else:
            images = images.to(device)
        scale, shift = self._on(device)
        out = images.float().mul_(scale).sub_(shift)
        if erase is not None:
            apply_erase(out, erase, self.erase_mode)
        return out


def apply_erase(batch: torch.Tensor, erase: torch.Tensor, mode: str, gen: torch.Generator | None = None) -> torch.Tensor:
    """Erase the boxes of `erase` ([B, 5] int64, ERASE_COLUMNS) in the normalised batch, in place.
    The noise comes from a CPU generator seeded per sample (or `gen`), as the worker-side erasing drew it."""
    for i, (top, left, h, w, seed) in enumerate(erase.tolist()):
        if h == 0:
            continue
        chan = batch.shape[1]
        gen_i = gen if gen is not None else torch.Generator().manual_seed(seed)
        if mode == "pixel":
            fill = torch.empty((chan, h, w), dtype=batch.dtype).normal_(generator=gen_i)
        elif mode == "rand":
            fill = torch.empty((chan, 1, 1), dtype=batch.dtype).normal_(generator=gen_i)
        else:
            fill = torch.zeros((chan, 1, 1), dtype=batch.dtype)
        batch[i, :, top:top + h, left:left + w] = fill.to(batch.device, non_blocking=True)
    return batch
