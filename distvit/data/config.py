"""The `data:` section of the run config: where the shards are and how samples become batches.

Defaults fit the built-in digits demo (`distvit data write digits --out data/digits`): 8x8
grayscale images, no flip (a mirrored digit is another glyph). For ImageNet-style RGB data set
`in_chans: 3`, `img_size: 224`, `hflip: 0.5`, `train_crop_scale: [0.08, 1.0]`.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from distvit.choices import (ERASE_MODES, INTERPOLATIONS, MIXUP_MODES, MP_CONTEXTS, ON_ERROR, PACK_RESIZE, SHARD_SPLITS,
                             bounded)

# Used when neither the config nor the dataset.json manifest gives statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


PROBABILITY = bounded(ge=0, le=1, hint="(a probability)")
BETA_ALPHA = bounded(ge=0, hint="(a Beta alpha: 0 turns it off, DeiT uses 0.8 / 1.0)")


class PackingConfig(BaseModel):
    """`data.packing`: native-resolution training (NaViT): whole images of any size packed into sequences.

    With it, data.batch_size is the number of packed sequences (rows) per micro-batch and rank, each of
    at most max_tokens patches; images keep their aspect ratio (docs/native_resolution.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_tokens: Annotated[int, bounded(ge=1)] = 256  # patches per sequence (the model adds its prefix tokens per image)
    # pixels: the shorter side is scaled up to at least this (the longer-side bound wins)
    min_side: Annotated[int, bounded(ge=1)] = 32
    max_side: Annotated[int, bounded(ge=1)] = 256  # pixels: the longer side is scaled down to at most this
    resize: Literal[PACK_RESIZE] = "native"  # random_res: a longer-side bound drawn per sample
    # images tried after one that does not fit before a batch is closed (1: plain greedy)
    lookahead: Annotated[int, bounded(ge=1)] = 8

    @model_validator(mode="after")
    def _sides(self):
        if self.min_side > self.max_side:
            raise ValueError(f"data.packing.min_side={self.min_side} is above max_side={self.max_side}; "
                             "set min_side <= max_side")
        return self


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Shards: a local path, a brace pattern (`train-{000000..000127}.tar`), a glob (`train-*.tar`,
    # local only), several joined with `::`, or any URL webdataset opens (`pipe:...`, `http://...`).
    train: str = "data/digits/train-*.tar"
    val: str | None = "data/digits/val-*.tar"
    # dataset.json (sample counts, classes, mean/std); None: looked up next to the shards.
    manifest: str | None = None
    # `pipe:CMD` shard URLs run CMD in a shell: refused unless this is true (a config you trust).
    allow_pipe: bool = False

    batch_size: Annotated[int, bounded(ge=1)] = 64  # per data-parallel rank (the micro batch)
    num_workers: Annotated[int, bounded(ge=0)] = 2  # DataLoader worker processes per rank; 0: in the trainer
    img_size: Annotated[int, bounded(ge=1)] = 8
    in_chans: int = 1  # 1: decode as grayscale (digits), 3: RGB
    mean: list[float] | None = None  # None: the manifest's, else ImageNet's
    std: list[float] | None = None

    shuffle: bool = True  # shard order and a sample block, both from (seed, epoch)
    shuffle_buffer: Annotated[int, bounded(ge=1)] = 2048  # raw samples each worker holds and permutes at a time
    # How an epoch is cut into equal per-rank, per-worker shares (docs/data.md, "Uneven shards"):
    # "samples": contiguous sample ranges, shards may be read partly by two workers; every sample
    #            once per epoch whatever the shard count (except the drop_last tail).
    # "shards":  whole shards round-robin (webdataset's split_by_node/split_by_worker); each share
    #            is then cut or wrapped to the same number of batches.
    shard_split: Literal[SHARD_SPLITS] = "samples"
    drop_last: bool = True  # False: the last global batch is completed with samples from the epoch start

    train_crop_scale: list[float] = [0.6, 1.0]  # random resized crop: area fraction range
    train_crop_ratio: list[float] = [0.75, 1.3333333333333333]  # ... and aspect ratio range
    hflip: Annotated[float, PROBABILITY] = 0.0  # probability of a horizontal flip
    # eval: resize the short side to img_size / eval_crop_pct, center crop
    eval_crop_pct: Annotated[float, bounded(gt=0, le=1, note="0.875 is the usual ImageNet value")] = 1.0
    interpolation: Literal[INTERPOLATIONS] = "bilinear"

    # Training recipes (timm's names; distvit/data/augment.py, distvit/data/mixup.py, docs/recipes.md).
    auto_augment: str | None = None  # "rand-m9-mstd0.5-inc1", "augmix-m3-w3", "3a", "trivialaugment"
    color_jitter: float | list[float] | None = None  # factor range 1 +- x; off when auto_augment is on (timm)
    three_augment: bool = False  # DeiT III: one of grayscale / solarize / blur per image
    reprob: Annotated[float, PROBABILITY] = 0.0  # random erasing probability (on the normalized image)
    remode: Literal[ERASE_MODES] = "pixel"
    mixup: Annotated[float, BETA_ALPHA] = 0.0  # mixup Beta alpha; > 0 turns it on
    cutmix: Annotated[float, BETA_ALPHA] = 0.0  # cutmix Beta alpha; > 0 turns it on
    mixup_prob: Annotated[float, PROBABILITY] = 1.0  # probability of mixing a batch (element / pair in those modes)
    mixup_switch_prob: Annotated[float, PROBABILITY] = 0.5  # with both on: probability of cutmix instead of mixup
    mixup_mode: Literal[MIXUP_MODES] = "batch"
    repeated_aug: int = 1  # DeiT's RASampler: each sample seen this many times per epoch, on different ranks

    # Native-resolution packing (NaViT); None: square crops of img_size. See PackingConfig.
    packing: PackingConfig | None = None

    on_error: Literal[ON_ERROR] = "skip"  # bad tar / image / label: stop, or warn, count and go on
    max_logged_errors: Annotated[int, bounded(ge=0)] = 20  # per worker and epoch; the rest are counted only

    pin_memory: bool | None = None  # None: on when CUDA is available
    prefetch_factor: Annotated[int, bounded(ge=1)] = 2  # batches each worker prepares ahead
    # a worker silent this long is an error, not a hang
    worker_timeout_s: Annotated[float, bounded(ge=0, hint="(0: no timeout)")] = 300.0
    mp_context: Literal[MP_CONTEXTS] | None = None  # None: torch's default

    @field_validator("in_chans")
    @classmethod
    def _chans(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError(f"data.in_chans must be 1 (grayscale) or 3 (RGB), got {v}")
        return v

    @field_validator("auto_augment")
    @classmethod
    def _auto_augment(cls, v: str | None) -> str | None:
        if v in (None, "", "none"):
            return None
        from distvit.data.augment import parse_auto_augment

        try:
            parse_auto_augment(v, {"translate_const": 100, "fill": 128, "resample": 0})
        except ValueError as exc:
            raise ValueError(f"data.auto_augment: {exc}") from None
        return v

    @field_validator("color_jitter")
    @classmethod
    def _jitter(cls, v):
        if isinstance(v, list) and len(v) not in (3, 4) or (v is not None and min([v] if not isinstance(v, list) else v) < 0):
            raise ValueError(f"data.color_jitter is one factor >= 0 or [brightness, contrast, saturation(, hue)], got {v}")
        return v

    @field_validator("train_crop_scale")
    @classmethod
    def _scale(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"data.train_crop_scale must be [low, high] with 0 < low <= high <= 1, got {v}")
        return v

    @field_validator("train_crop_ratio")
    @classmethod
    def _ratio(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0.0 < v[0] <= v[1]:
            raise ValueError(f"data.train_crop_ratio must be [low, high] with 0 < low <= high, got {v}")
        return v

    @model_validator(mode="after")
    def _stats(self):
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.in_chans:
                raise ValueError(
                    f"data.{name} has {len(value)} values but data.in_chans={self.in_chans}; "
                    f"give one value per channel or null to take them from the dataset manifest"
                )
        if self.repeated_aug < 1:
            raise ValueError(f"data.repeated_aug must be >= 1 (1: off, DeiT uses 3), got {self.repeated_aug}")
        if self.repeated_aug > 1 and self.shard_split != "samples":
            raise ValueError(f"data.repeated_aug={self.repeated_aug} needs data.shard_split=samples (got "
                             f"{self.shard_split}): the repeats are placed by sample position")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"data.batch_size={self.batch_size} is odd, but mixup/cutmix pair each sample with the "
                             f"batch reversed; set data.batch_size={self.batch_size + 1} or data.mixup=data.cutmix=0")
        if self.packing is not None:
            mixing = [n for n in ("mixup", "cutmix", "reprob") if getattr(self, n) > 0] + (
                ["auto_augment"] if self.auto_augment else []) + (["repeated_aug"] if self.repeated_aug > 1 else [])
            if mixing:
                raise ValueError(f"data.packing takes whole images at their own size; data.{mixing[0]} needs square "
                                 f"batches of one size; set data.{mixing[0]} off or data.packing=null")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"data.std must be > 0 per channel, got {self.std}")
        return self
