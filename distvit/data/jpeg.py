"""Reduced-size JPEG decoding for a crop: PIL's draft mode (libjpeg's DCT scaling by 1/2, 1/4, 1/8).

A random resized crop of w x h pixels resized to size x size needs no more than a 1/f-scale decode
with f <= min(w, h) / size: libjpeg then skips most of the inverse-DCT work and the resize has fewer
pixels to filter. The crop box is drawn on the full-size image (so the draws, and resume, do not
change), then scaled to the drafted image. Only JPEGs are drafted; other formats decode in full.
"""
from __future__ import annotations

import math

from PIL import Image


def draft_for_crop(img: Image.Image, mode: str, box, size: int) -> tuple:
    """Ask `img` (opened, not yet loaded) for the smallest JPEG decode that still gives the crop at
    least `size` pixels on each side; return the box in the decoded image's coordinates."""
    if img.format != "JPEG" or size <= 0:
        return box
    factor = min(box[2] - box[0], box[3] - box[1]) / size
    if factor < 2:
        return box
    width, height = img.size
    # draft() picks the largest 1/s (s in 1, 2, 4, 8) with s <= size // requested; ceil keeps s <= factor.
    img.draft(mode, (math.ceil(width / factor), math.ceil(height / factor)))
    sx, sy = img.size[0] / width, img.size[1] / height
    if (sx, sy) == (1.0, 1.0):
        return box
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
