"""Image augmentation with timm's names and numerics, drawn from a per-sample generator.

    aug = build_augment(cfg, img_size=224, mean=(0.485, 0.456, 0.406), interpolation="bicubic")
    img = aug(img, draws)              # PIL -> PIL, after the random resized crop and flip
    erase(tensor_chw, draws)           # random erasing, on the normalized tensor (as timm)

`data.auto_augment` takes timm's strings: "rand-m9-mstd0.5-inc1" (RandAugment), "augmix-m3-w3"
(AugMix), "3a" (DeiT III's 3-Augment: one of grayscale / solarize / blur) and "trivialaugment"
(TrivialAugment-Wide, torchvision's op table). `data.color_jitter` (brightness = contrast =
saturation factor range, as timm's scalar), `data.reprob`/`data.remode` (random erasing) and
`data.three_augment` complete the DeiT / DeiT III recipes.

Why a port and not `import timm`: timm is not a runtime dependency of distvit (its data package
imports torchvision at module level, and torchvision does not load beside the CPU torch pin), and
timm's ops draw from the *global* `random` / `numpy.random` state, which a DataLoader worker shares
between samples: the draws of one sample would depend on what the worker did before it, so
augmentation would change with the worker count and a resumed run would not match. Here every op
function is timm's (same PIL calls, same level-to-argument maps, same `mstd` magnitude noise, same
order of draws) but draws from `Draws`: a `random.Random` and a `numpy.random.RandomState` seeded
per sample from (seed, epoch, shard, key). Tests seed timm's globals and ours identically and
compare the images byte for byte (tests/test_augment.py).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

LEVEL_DENOM = 10.0  # timm: magnitude M in [0, 10] -> fraction of the op's range


@dataclass
class Draws:
    """The random sources of one sample: timm's ops use python `random` and numpy's legacy generator."""

    py: random.Random
    np: np.random.RandomState

    @classmethod
    def from_rng(cls, rng: random.Random) -> "Draws":
        return cls(rng, np.random.RandomState(rng.getrandbits(32)))

    @classmethod
    def seeded(cls, seed: int) -> "Draws":
        return cls(random.Random(seed), np.random.RandomState(seed))


# ------------------------------------------------------------------ timm's ops (auto_augment.py)

def _affine(img, matrix, fill, resample):
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _posterize(img, bits):
    """timm's posterize. PosterizeIncreasing reaches 0 bits at magnitude 10, which Pillow >= 10 refuses
    (timm then crashes); the mask of 0 bits is what older Pillow applied: every pixel 0."""
    if bits >= 8:
        return img
    return ImageOps.posterize(img, bits) if bits >= 1 else img.point(lambda _: 0)


def _solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    if img.mode in ("L", "RGB"):
        return img.point(lut * 3 if img.mode == "RGB" else lut)
    return img


OPS = {
    "AutoContrast": lambda img, kw: ImageOps.autocontrast(img),
    "Equalize": lambda img, kw: ImageOps.equalize(img),
    "Invert": lambda img, kw: ImageOps.invert(img),
    "Rotate": lambda img, kw, deg: img.rotate(deg, resample=kw["resample"], fillcolor=kw["fill"]),
    "Posterize": lambda img, kw, bits: _posterize(img, bits),
    "Solarize": lambda img, kw, thresh: ImageOps.solarize(img, thresh),
    "SolarizeAdd": lambda img, kw, add: _solarize_add(img, add),
    "Color": lambda img, kw, f: ImageEnhance.Color(img).enhance(f),
    "Contrast": lambda img, kw, f: ImageEnhance.Contrast(img).enhance(f),
    "Brightness": lambda img, kw, f: ImageEnhance.Brightness(img).enhance(f),
    "Sharpness": lambda img, kw, f: ImageEnhance.Sharpness(img).enhance(f),
    "ShearX": lambda img, kw, f: _affine(img, (1, f, 0, 0, 1, 0), kw["fill"], kw["resample"]),
    "ShearY": lambda img, kw, f: _affine(img, (1, 0, 0, f, 1, 0), kw["fill"], kw["resample"]),
    "TranslateX": lambda img, kw, px: _affine(img, (1, 0, px, 0, 1, 0), kw["fill"], kw["resample"]),
    "TranslateY": lambda img, kw, px: _affine(img, (1, 0, 0, 0, 1, px), kw["fill"], kw["resample"]),
    "TranslateXRel": lambda img, kw, pct: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), kw["fill"], kw["resample"]),
    "TranslateYRel": lambda img, kw, pct: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), kw["fill"], kw["resample"]),
    "Desaturate": lambda img, kw, f: ImageEnhance.Color(img).enhance(min(1.0, max(0.0, 1.0 - f))),
    "GaussianBlurRand": lambda img, kw, f: img.filter(ImageFilter.GaussianBlur(radius=kw["draws"].py.uniform(0.1, 2.0 * f))),
}
for _inc in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"):
    OPS[_inc + "Increasing"] = OPS[_inc]


def _negate(v, d: Draws):
    return -v if d.py.random() > 0.5 else v


def _enhance_inc(m, hp, d):
    return max(0.1, 1.0 + _negate(m / LEVEL_DENOM * 0.9, d))


LEVEL_TO_ARG = {
    "Rotate": lambda m, hp, d: _negate(m / LEVEL_DENOM * 30.0, d),
    "Posterize": lambda m, hp, d: int(m / LEVEL_DENOM * 4),
    "PosterizeIncreasing": lambda m, hp, d: 4 - int(m / LEVEL_DENOM * 4),
    "Solarize": lambda m, hp, d: min(256, int(m / LEVEL_DENOM * 256)),
    "SolarizeIncreasing": lambda m, hp, d: 256 - min(256, int(m / LEVEL_DENOM * 256)),
    "SolarizeAdd": lambda m, hp, d: min(128, int(m / LEVEL_DENOM * 110)),
    "ShearX": lambda m, hp, d: _negate(m / LEVEL_DENOM * 0.3, d),
    "ShearY": lambda m, hp, d: _negate(m / LEVEL_DENOM * 0.3, d),
    "TranslateX": lambda m, hp, d: _negate(m / LEVEL_DENOM * float(hp["translate_const"]), d),
    "TranslateY": lambda m, hp, d: _negate(m / LEVEL_DENOM * float(hp["translate_const"]), d),
    "TranslateXRel": lambda m, hp, d: _negate(m / LEVEL_DENOM * hp.get("translate_pct", 0.45), d),
    "TranslateYRel": lambda m, hp, d: _negate(m / LEVEL_DENOM * hp.get("translate_pct", 0.45), d),
    "Desaturate": lambda m, hp, d: max(0.5, min(1.0, 0.5 + 0.5 * m / LEVEL_DENOM)),
    "GaussianBlurRand": lambda m, hp, d: max(0.0, min(1.0, m / LEVEL_DENOM)),
}
for _name in ("Color", "Contrast", "Brightness", "Sharpness"):
    LEVEL_TO_ARG[_name] = lambda m, hp, d: m / LEVEL_DENOM * 1.8 + 0.1
    LEVEL_TO_ARG[_name + "Increasing"] = _enhance_inc

RAND_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
RAND_INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                   "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                   "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
AUGMIX_TRANSFORMS = ["AutoContrast", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                     "SharpnessIncreasing", "Equalize", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                     "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


class AugmentOp:
    """timm's AugmentOp: apply with `prob`, magnitude with gaussian (`mstd`) or uniform (mstd=inf) noise."""

    def __init__(self, name: str, prob: float, magnitude: float, hparams: dict):
        self.name, self.prob, self.magnitude, self.hparams = name, prob, magnitude, hparams
        self.fn, self.level_fn = OPS[name], LEVEL_TO_ARG.get(name)
        self.mstd = hparams.get("magnitude_std", 0)
        self.mmax = hparams.get("magnitude_max")

    def __call__(self, img: Image.Image, d: Draws) -> Image.Image:
        if self.prob < 1.0 and d.py.random() > self.prob:
            return img
        m = self.magnitude
        if self.mstd == float("inf"):
            m = d.py.uniform(0, m)
        elif self.mstd > 0:
            m = d.py.gauss(m, self.mstd)
        m = max(0.0, min(m, self.mmax or LEVEL_DENOM))
        kw = {"fill": self.hparams["fill"], "resample": self.hparams["resample"], "draws": d}
        return self.fn(img, kw) if self.level_fn is None else self.fn(img, kw, self.level_fn(m, self.hparams, d))


def _sections(text: str, allowed: set[str]) -> dict[str, str]:
    out = {}
    for part in text.split("-")[1:]:
        key, *val = re.split(r"(\d.*)", part)
        if not val:
            continue
        if key not in allowed:
            raise ValueError(f"'{key}{val[0]}' in '{text}' is not one of {sorted(allowed)}")
        out[key] = val[0]
    return out


class RandAugment:
    """timm's rand_augment_transform: n ops chosen with numpy, each applied with prob p."""

    def __init__(self, text: str, hparams: dict):
        s = _sections(text, {"m", "n", "p", "mstd", "mmax", "inc"})
        hp = dict(hparams)
        if "mstd" in s:
            mstd = float(s["mstd"])
            hp["magnitude_std"] = float("inf") if mstd > 100 else mstd
        if "mmax" in s:
            hp["magnitude_max"] = int(s["mmax"])
        names = RAND_INCREASING if bool(int(s.get("inc", 0))) else RAND_TRANSFORMS
        m, p = int(s.get("m", LEVEL_DENOM)), float(s.get("p", 0.5))
        self.ops = [AugmentOp(n, p, m, hp) for n in names]
        self.num_layers = int(s.get("n", 2))

    def __call__(self, img, d: Draws):
        for i in d.np.choice(len(self.ops), self.num_layers, replace=True):
            img = self.ops[i](img, d)
        return img


class AugMix:
    """timm's AugMixAugment (the non-blended path): Dirichlet-weighted chains, then a Beta blend."""

    def __init__(self, text: str, hparams: dict):
        s = _sections(text, {"m", "w", "d", "a", "b", "mstd"})
        if int(s.get("b", 0)):
            raise ValueError(f"'{text}': the blended AugMix variant (b1) is not supported; drop '-b1'")
        hp = {**hparams, "translate_pct": 0.3, "magnitude_std": float(s.get("mstd", "inf"))}
        self.ops = [AugmentOp(n, 1.0, int(s.get("m", 3)), hp) for n in AUGMIX_TRANSFORMS]
        self.width, self.depth, self.alpha = int(s.get("w", 3)), int(s.get("d", -1)), float(s.get("a", 1.0))

    def __call__(self, img, d: Draws):
        weights = np.float32(d.np.dirichlet([self.alpha] * self.width))
        m = np.float32(d.np.beta(self.alpha, self.alpha))
        mixed = np.zeros_like(np.asarray(img), dtype=np.float32)
        for w in weights:
            depth = self.depth if self.depth > 0 else d.np.randint(1, 4)
            aug = img
            for i in d.np.choice(len(self.ops), depth, replace=True):
                aug = self.ops[i](aug, d)
            mixed += w * np.asarray(aug, dtype=np.float32)
        np.clip(mixed, 0, 255.0, out=mixed)
        return Image.blend(img, Image.fromarray(mixed.astype(np.uint8)), m)


class ThreeAugment:
    """DeiT III's 3-Augment as timm's "3a" policy: one of solarize(128) / grayscale / blur(0.1-2.0)."""

    def __init__(self, hparams: dict):
        self.policy = [AugmentOp("Solarize", 1.0, 5, hparams), AugmentOp("Desaturate", 1.0, 10, hparams),
                       AugmentOp("GaussianBlurRand", 1.0, 10, hparams)]

    def __call__(self, img, d: Draws):
        return d.py.choice(self.policy)(img, d)


class TrivialAugmentWide:
    """TrivialAugment (Müller & Hutter 2021) with torchvision's wide op table: one op, uniform
    magnitude bin of 31, signed ops negated with probability 1/2."""

    BINS = 31

    def __init__(self, hparams: dict):
        self.hp = hparams
        b = np.linspace
        self.table = {
            "Identity": None, "ShearX": b(0, 0.99, self.BINS), "ShearY": b(0, 0.99, self.BINS),
            "TranslateX": b(0, 32.0, self.BINS), "TranslateY": b(0, 32.0, self.BINS), "Rotate": b(0, 135.0, self.BINS),
            "Brightness": b(0, 0.99, self.BINS), "Color": b(0, 0.99, self.BINS), "Contrast": b(0, 0.99, self.BINS),
            "Sharpness": b(0, 0.99, self.BINS),
            "Posterize": 8 - np.round(np.arange(self.BINS) / ((self.BINS - 1) / 6)).astype(int),
            "Solarize": b(255.0, 0.0, self.BINS), "AutoContrast": None, "Equalize": None,
        }
        self.names = list(self.table)

    def __call__(self, img, d: Draws):
        name = self.names[d.py.randrange(len(self.names))]
        mags = self.table[name]
        if mags is None:
            return img if name == "Identity" else OPS[name](img, self.hp)
        v = float(mags[d.py.randrange(self.BINS)])
        if name in ("Posterize", "Solarize"):
            return OPS[name](img, self.hp, int(v))
        if name.startswith(("Shear", "Translate", "Rotate")) or name in ("Brightness", "Color", "Contrast", "Sharpness"):
            v = _negate(v, d)
        if name in ("Brightness", "Color", "Contrast", "Sharpness"):
            v = 1.0 + v
        return OPS[name](img, self.hp, v)


class ColorJitter:
    """torchvision's ColorJitter (PIL path) for brightness / contrast / saturation [/ hue]: each factor
    uniform in [1 - s, 1 + s] (hue in [-h, h]), applied in a random order."""

    def __init__(self, strength: float | list[float]):
        s = [float(strength)] * 3 if isinstance(strength, (int, float)) else [float(x) for x in strength]
        self.b, self.c, self.s = s[:3]
        self.h = s[3] if len(s) > 3 else 0.0

    def __call__(self, img, d: Draws):
        order = list(range(4))
        d.py.shuffle(order)
        for i in order:
            if i == 0 and self.b:
                img = ImageEnhance.Brightness(img).enhance(d.py.uniform(max(0.0, 1 - self.b), 1 + self.b))
            elif i == 1 and self.c:
                img = ImageEnhance.Contrast(img).enhance(d.py.uniform(max(0.0, 1 - self.c), 1 + self.c))
            elif i == 2 and self.s:
                img = ImageEnhance.Color(img).enhance(d.py.uniform(max(0.0, 1 - self.s), 1 + self.s))
            elif i == 3 and self.h and img.mode == "RGB":
                img = adjust_hue(img, d.py.uniform(-self.h, self.h))
        return img


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    np_h = np.asarray(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h = np_h + np.uint8(int(factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


class Compose:
    def __init__(self, parts):
        self.parts = parts

    def __call__(self, img, d: Draws):
        for p in self.parts:
            img = p(img, d)
        return img


def aa_hparams(img_size: int, mean, interpolation: str, in_chans: int) -> dict:
    """timm's create_transform: translate_const = 45% of the size, fill = the mean colour."""
    from distvit.data.transforms import RESAMPLE

    fill = tuple(min(255, round(255 * x)) for x in mean)
    return {"translate_const": int(img_size * 0.45), "fill": fill if in_chans == 3 else fill[0],
            "resample": RESAMPLE[interpolation]}


def parse_auto_augment(text: str, hparams: dict):
    if text.startswith("rand"):
        return RandAugment(text, hparams)
    if text.startswith("augmix"):
        return AugMix(text, hparams)
    if text == "3a":
        return ThreeAugment(hparams)
    if text in ("trivialaugment", "ta_wide"):
        return TrivialAugmentWide(hparams)
    raise ValueError(f"'{text}' is not a supported auto-augment; use rand-m9-mstd0.5-inc1, augmix-m3-w3, 3a, "
                     "trivialaugment or null")


def build_augment(auto_augment: str | None, color_jitter, three_augment: bool, *, img_size: int, mean,
                  interpolation: str, in_chans: int):
    """The PIL stage after crop and flip, in timm's order; None when there is nothing to do.
    As timm: colour jitter is skipped when an auto-augment other than 3-Augment is on."""
    hp = aa_hparams(img_size, mean, interpolation, in_chans)
    parts = []
    if three_augment:
        parts.append(ThreeAugment(hp))
    if auto_augment:
        parts.append(parse_auto_augment(auto_augment, hp))
    jitter_on = color_jitter and (not auto_augment or "3a" in auto_augment)
    if jitter_on:
        parts.append(ColorJitter(color_jitter))
    return Compose(parts) if parts else None


class RandomErasing:
    """timm's RandomErasing on one normalized CHW tensor (modes const / rand / pixel, one box);
    the box from the sample's python draws, the noise from a generator seeded by them."""

    def __init__(self, prob: float, mode: str = "pixel", min_area=0.02, max_area=1 / 3, min_aspect=0.3):
        self.prob, self.mode = prob, mode
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def plan(self, shape, d: Draws) -> tuple[int, int, int, int, int] | None:
        """The sample's draws: (top, left, height, width, noise seed), or None when not erased."""
        if d.py.random() > self.prob:
            return None
        _, h_img, w_img = shape
        area = h_img * w_img
        for _ in range(10):
            target = d.py.uniform(self.min_area, self.max_area) * area
            aspect = math.exp(d.py.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if w < w_img and h < h_img:
                top, left = d.py.randint(0, h_img - h), d.py.randint(0, w_img - w)
                return top, left, h, w, d.py.getrandbits(63)
        return None

    def __call__(self, img: torch.Tensor, d: Draws, gen: torch.Generator | None = None) -> torch.Tensor:
        """Erase one CHW tensor in place; `gen` (if given) supplies the noise instead of the drawn seed."""
        from distvit.data.device import apply_erase

        box = self.plan(img.shape, d)
        if box is not None:
            apply_erase(img[None], torch.tensor([box], dtype=torch.int64), self.mode, gen)
        return img
