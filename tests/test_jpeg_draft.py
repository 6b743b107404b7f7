"""JPEG draft decoding for crops (distvit.data.jpeg): smaller decodes only when the crop allows, close
to the full decode, and never for other formats."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from distvit.data.transforms import EvalTransform, decode_crop


def photo_like(fmt: str, w: int = 500, h: int = 376) -> dict:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 0.4 + yy * 0.2) % 256, 128 + 100 * np.sin(xx / 23.0), (yy * 0.6) % 256], -1)
    rgb += np.random.RandomState(0).normal(0, 6, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return {"jpg" if fmt == "JPEG" else "png": buf.getvalue()}


def full_crop(sample, box, size):
    img = Image.open(io.BytesIO(next(iter(sample.values())))).convert("RGB")
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=box)).astype(float)


def test_large_crop_to_a_small_output_decodes_a_reduced_jpeg_close_to_the_full_decode():
    sample, box = photo_like("JPEG"), (10, 8, 410, 360)  # 400 x 352 -> 96: factor 3.7, a 1/2 decode
    img, drafted = decode_crop(sample, 3, lambda w, h: box, 96)
    assert img.size == (250, 188)
    assert drafted == (5.0, 4.0, 205.0, 180.0)
    out = np.asarray(img.resize((96, 96), Image.BILINEAR, box=drafted)).astype(float)
    assert np.abs(out - full_crop(sample, box, 96)).mean() < 3.0  # of 255; measured ~1-2 on photos


def test_crop_needing_most_pixels_and_other_formats_decode_in_full():
    box = (0, 0, 300, 300)  # 300 -> 224: no 2x reduction possible, so pixels equal the full decode
    for fmt, b, size in (("JPEG", box, 224), ("PNG", (0, 0, 480, 360), 64)):
        sample = photo_like(fmt)
        img, got = decode_crop(sample, 3, lambda w, h: b, size)
        assert img.size == (500, 376) and got == b
        np.testing.assert_array_equal(np.asarray(img.resize((size, size), Image.BILINEAR, box=got)), full_crop(sample, b, size))


def test_eval_center_crop_uses_the_draft_box():
    sample, t = photo_like("JPEG", 800, 600), EvalTransform(128, 3, 0.875, "bilinear")
    img, box = decode_crop(sample, 3, t.box, 128)
    assert img.size == (200, 150)  # 525 px side -> 128: a 1/4 decode
    out = t(img, box=box).astype(float)
    assert out.shape == (128, 128, 3)
    assert np.abs(out - full_crop(sample, t.box(800, 600), 128)).mean() < 3.0
