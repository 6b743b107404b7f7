"""Decode and augment one sample with PIL (uint8); normalisation runs on the device (distvit.data.device).

torchvision is not a dependency, so the two transforms ViT training needs are written here:
random resized crop (torchvision's sampling: 10 tries of area/ratio, then a center fallback) and
resize + center crop for evaluation. Both do crop and resize in one `Image.resize(box=...)`.
Randomness comes from a per-sample generator seeded by (seed, epoch, shard, key), so a sample's
augmentation does not depend on which worker reads it, and resuming needs no RNG state.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import random

import numpy as np
import torch
from PIL import Image

from distvit.data.errors import BadSample
from distvit.data.jpeg import draft_for_crop

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def sample_rng(seed: int, epoch: int, url: str, key: str) -> random.Random:
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{url.rsplit('/', 1)[-1]}\0{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def decode_image(sample: dict, in_chans: int) -> Image.Image:
    return decode_crop(sample, in_chans)[0]


def decode_crop(sample: dict, in_chans: int, crop=None, size: int = 0) -> tuple[Image.Image, tuple | None]:
    """Decode the sample's image; with `crop` ((width, height) -> box, drawn on the full-size image) a
    JPEG is decoded only as large as the box needs for a `size` x `size` output (distvit.data.jpeg),
    and the box comes back in the decoded image's coordinates."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"no image file (looked for .{'/.'.join(IMAGE_EXTS[:4])}; the sample has {have})")
    mode = "L" if in_chans == 1 else "RGB"
    box = None
    try:
        img = Image.open(io.BytesIO(sample[ext]))
        if crop is not None:
            box = draft_for_crop(img, mode, crop(img.width, img.height), size)
        img = img.convert(mode)  # convert() forces the full decode
    except Exception as exc:
        raise BadSample(f"cannot decode .{ext} image ({type(exc).__name__}: {exc})") from None
    return img, box


def decode_label(sample: dict, num_classes: int | None) -> int:
    if "cls" in sample:
        raw = sample["cls"]
        try:
            label = int(raw.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise BadSample(f"label .cls is not an integer: {raw[:20]!r}") from None
    elif "json" in sample:
        try:
            label = json.loads(sample["json"])["label"]
        except Exception:
            raise BadSample("no .cls file and the .json has no integer 'label'") from None
        if not isinstance(label, int):
            raise BadSample(f"label in .json is not an integer: {label!r}")
    else:
        raise BadSample("missing label (no .cls file)")
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise BadSample(f"label {label} is out of range [0, {num_classes}) of the manifest's classes")
    return label


def random_resized_box(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return x, y, x + w, y + h
    # Fallback: the largest center crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def center_box(width: int, height: int, size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """The region that `resize(short side -> size / crop_pct)` then `center_crop(size)` would keep."""
    side = min(width, height) * crop_pct
    x, y = (width - side) / 2, (height - side) / 2
    return x, y, x + side, y + side


class TrainTransform:
    """Crop, flip, then (data.auto_augment / color_jitter / three_augment) the PIL stage of
    distvit.data.augment; random erasing is drawn in `erase_plan` and applied after device normalisation.
    Every draw comes from the sample's own generator, in that order."""

    def __init__(self, size: int, in_chans: int, scale, ratio, hflip: float, interpolation: str,
                 augment: tuple = (), mean=(0.5,)):
        self.size, self.in_chans = size, in_chans
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.resample = RESAMPLE[interpolation]
        auto_augment, color_jitter, three_augment, reprob, remode = augment or (None, None, False, 0.0, "pixel")
        from distvit.data.augment import RandomErasing, build_augment

        self.augment = build_augment(auto_augment, color_jitter, three_augment, img_size=size, mean=mean,
                                     interpolation=interpolation, in_chans=in_chans)
        self.erase = RandomErasing(reprob, remode) if reprob > 0 else None

    def box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        return random_resized_box(width, height, self.scale, self.ratio, rng)

    def __call__(self, img: Image.Image, rng: random.Random, box=None) -> np.ndarray:
        """`box`: the crop already drawn (by `box`, e.g. for a draft decode); else drawn here."""
        if box is None:
            box = self.box(img.width, img.height, rng)
        out = img.resize((self.size, self.size), self.resample, box=box)
        if self.hflip and rng.random() < self.hflip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if self.augment is not None:
            from distvit.data.augment import Draws

            out = self.augment(out, Draws.from_rng(rng))
        return np.asarray(out)

    def erase_plan(self, rngs: list[random.Random], shape) -> torch.Tensor | None:
        """Random erasing's draws for each sample, from its own generator after the PIL stage:
        [B, 5] int64 (distvit.data.device.ERASE_COLUMNS); the erasing itself runs on the normalised
        batch on the training device (distvit.data.device.DeviceNormalize), as timm's prefetcher does."""
        if self.erase is None:
            return None
        from distvit.data.augment import Draws

        plans = [self.erase.plan(shape, Draws(rng, None)) or (0, 0, 0, 0, 0) for rng in rngs]
        return torch.tensor(plans, dtype=torch.int64)


class EvalTransform:
    def __init__(self, size: int, in_chans: int, crop_pct: float, interpolation: str):
        self.size, self.in_chans, self.crop_pct = size, in_chans, crop_pct
        self.resample = RESAMPLE[interpolation]

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        return center_box(width, height, self.size, self.crop_pct)

    def __call__(self, img: Image.Image, rng=None, box=None) -> np.ndarray:
        if box is None:
            box = self.box(img.width, img.height)
        if img.size == (self.size, self.size) and box == (0, 0, self.size, self.size):
            return np.asarray(img)  # already the right size: keep the pixels exactly
        return np.asarray(img.resize((self.size, self.size), self.resample, box=box))
