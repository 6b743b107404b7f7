"""Sequence packing for native-resolution training (NaViT-style): many images of any size in few sequences.

    packed = pack(images, patch_size=16, max_tokens=1024)   # images: list of (C, H, W) tensors
    logits = model.forward_packed(packed)                   # (len(images), classes), input order

Each image is cut into its patch grid (H/p x W/p patches, raster order) and placed whole in one
sequence; sequences hold at most `max_tokens` patches (first fit, in input order, so the result
is deterministic). A PackedBatch carries, per sequence row (padded to the longest row):

- patches (S, L, C*p*p): patch pixels, flattened in (C, ph, pw) order (the patch conv's weight order);
- positions (S, L, 2): each patch's (row, col) in its own image's patch grid;
- image_ids (S, L): the input index of the image each patch belongs to, -1 for padding;
- seq_lens (S,): real patches per row; cu_seqlens (N+1,): cumulative patch counts of the images
  in packing order (rows concatenated without padding), as flash-attn's varlen kernels take them;
- grid_sizes (N, 2): each image's patch grid; image_slots (N, 2): its (sequence, first slot).

The model adds its own prefix tokens (class token) in front of each image when it embeds the
patches (`model.forward_packed`); `max_tokens` bounds the patches only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distvit.choices import PACK_RESIZE



@dataclass
class PackedBatch:
    patches: torch.Tensor
    positions: torch.Tensor
    image_ids: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens: torch.Tensor
    grid_sizes: torch.Tensor
    image_slots: torch.Tensor
    patch_size: tuple[int, int]
    in_chans: int
    # Set by the packed loader: the patch grids of every image all dp ranks see in this step (img/s, FLOPs).
    step_grids: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.grid_sizes.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.patches.shape[0]

    def useful_fraction(self) -> float:
        """Real patches over all slots (1 - padding fraction)."""
        return float(self.seq_lens.sum()) / max(1, self.patches.shape[0] * self.patches.shape[1])

    def __len__(self) -> int:
        return self.num_images

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "PackedBatch":
        """On `device`; `dtype` casts the patch pixels only (index tables stay integer). step_grids stay on
        the host: the trainer counts FLOPs from them without waiting for the device."""
        moved = {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) and k != "step_grids" else v)
                 for k, v in self.__dict__.items()}
        if dtype is not None:
            moved["patches"] = moved["patches"].to(dtype)
        return PackedBatch(**moved)


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def patchify(image: torch.Tensor, patch_size) -> torch.Tensor:
    """(C, H, W) -> (H/ph * W/pw, C*ph*pw), raster order, pixels in (C, ph, pw) order."""
    ph, pw = patch_size
    c, h, w = image.shape
    x = image.reshape(c, h // ph, ph, w // pw, pw).permute(1, 3, 0, 2, 4)
    return x.reshape((h // ph) * (w // pw), c * ph * pw)


def _check(images, patch_size, max_tokens):
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("pack: images must be a non-empty list of (C, H, W) tensors")
    chans = images[0].shape[0] if torch.is_tensor(images[0]) and images[0].dim() == 3 else None
    for i, img in enumerate(images):
        if not torch.is_tensor(img) or img.dim() != 3 or img.shape[0] != chans:
            shape = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
            raise ValueError(f"pack: images[{i}] has shape {shape}; every image must be (C, H, W) with the same C "
                             f"({chans})")
        h, w = img.shape[1:]
        if h % patch_size[0] or w % patch_size[1]:
            raise ValueError(f"pack: images[{i}] is {h}x{w}, not a multiple of patch size {patch_size[0]}x"
                             f"{patch_size[1]}; resize it (data.packing.resize) to a multiple first")
        n = (h // patch_size[0]) * (w // patch_size[1])
        if n > max_tokens:
            raise ValueError(f"pack: images[{i}] ({h}x{w}) has {n} patches, more than max_tokens={max_tokens}; raise "
                             "max_tokens (data.packing.max_tokens) or lower data.packing.max_side")
    return chans


def pack(images, patch_size, max_tokens: int, max_images_per_seq: int | None = None) -> PackedBatch:
    """Pack a list of (C, H, W) images into sequences of at most max_tokens patches; see the module doc.

    max_images_per_seq: at most this many images per sequence (1: the padded baseline, one image
    per row padded to the longest).
    """
    patch_size = _pair(patch_size)
    if max_tokens < 1:
        raise ValueError(f"pack: max_tokens={max_tokens} must be >= 1")
    chans = _check(images, patch_size, max_tokens)
    grids = [(img.shape[1] // patch_size[0], img.shape[2] // patch_size[1]) for img in images]
    sizes = [gh * gw for gh, gw in grids]
    rows: list[list[int]] = []
    fill: list[int] = []
    for i, n in enumerate(sizes):  # first fit, input order
        for r, used in enumerate(fill):
            if used + n <= max_tokens and (max_images_per_seq is None or len(rows[r]) < max_images_per_seq):
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    S, L = len(rows), max(fill)
    dim = chans * patch_size[0] * patch_size[1]
    ref = images[0]
    patches = ref.new_zeros(S, L, dim)
    positions = torch.zeros(S, L, 2, dtype=torch.long)
    image_ids = torch.full((S, L), -1, dtype=torch.long)
    slots = torch.zeros(len(images), 2, dtype=torch.long)
    order = []
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            gh, gw = grids[i]
            n = sizes[i]
            patches[r, at:at + n] = patchify(images[i], patch_size)
            rr, cc = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            positions[r, at:at + n] = torch.stack([rr.flatten(), cc.flatten()], dim=1)
            image_ids[r, at:at + n] = i
            slots[i] = torch.tensor([r, at])
            order.append(n)
            at += n
    cu = torch.zeros(len(images) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(order), 0)
    return PackedBatch(patches=patches, positions=positions.to(ref.device), image_ids=image_ids.to(ref.device),
                       seq_lens=torch.tensor(fill), cu_seqlens=cu, grid_sizes=torch.tensor(grids),
                       image_slots=slots, patch_size=patch_size, in_chans=chans)


# --- resizing and collation for the loader (data.packing: {max_tokens, min_side, max_side, resize}) ----------

RESIZE_MODES = PACK_RESIZE  # data.packing.resize


def target_size(h: int, w: int, patch: int, min_side: int, max_side: int, mode: str = "native",
                generator: torch.Generator | None = None) -> tuple[int, int]:
    """The (H, W) an h x w image is resized to before packing, both multiples of `patch`.

    native: keep the aspect ratio; scale down so the longer side is at most max_side, up so the
    shorter side is at least min_side (the longer-side bound wins when both cannot hold); each
    side is then rounded to the nearest multiple of the patch (at least one patch).
    random_res: as native with the longer-side bound drawn uniformly from the patch multiples in
    [min_side, max_side] by `generator` (NaViT's resolution sampling; seed the generator per sample
    for a reproducible, resumable stream).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"data.packing.resize={mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if not 0 < min_side <= max_side:
        raise ValueError(f"data.packing: min_side={min_side}, max_side={max_side}; need 0 < min_side <= max_side")
    bound = max_side
    if mode == "random_res":
        choices = list(range(-(-min_side // patch) * patch, max_side + 1, patch)) or [max_side]
        bound = choices[int(torch.randint(len(choices), (1,), generator=generator))]
    scale = min(bound / max(h, w), max(1.0, min_side / min(h, w)))
    return tuple(max(patch, int(round(s * scale / patch)) * patch) for s in (h, w))


def resize_for_packing(image: torch.Tensor, patch: int, min_side: int, max_side: int, mode: str = "native",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(C, h, w) -> (C, H, W) at target_size (bilinear, antialiased when shrinking)."""
    size = target_size(image.shape[1], image.shape[2], patch, min_side, max_side, mode, generator)
    if size == tuple(image.shape[1:]):
        return image
    out = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                                          antialias=size[0] < image.shape[1] or size[1] < image.shape[2])
    return out[0].to(image.dtype)


def collate_packed(samples, patch_size, max_tokens: int):
    """[(image (C, H, W), label), ...] -> (PackedBatch, labels (N,)), labels in input order."""
    images, labels = zip(*samples)
    return pack(list(images), patch_size, max_tokens), torch.as_tensor(labels)
