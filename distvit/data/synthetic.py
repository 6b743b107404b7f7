"""Small synthetic shard sets whose pixels encode the sample index, for tests and benchmarks.

Sample i is an image whose first two pixels (channel 0) hold i % 256 and i // 256, so whoever sees
a batch can tell exactly which samples it holds (with an identity transform: crop scale [1, 1],
no flip, mean 0, std 1). The rest is seeded noise, so decoding has real work to do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from distvit.data.write import DEFAULT_SHARD_BYTES, Record, image_stats, write_dataset


def synthetic_image(index: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    shape = (size, size) if channels == 1 else (size, size, channels)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    flat = img.reshape(-1) if channels == 1 else img[..., 0].reshape(-1)
    flat[0], flat[1] = index % 256, index // 256
    if channels == 1:
        return flat.reshape(shape)
    img[..., 0] = flat.reshape(size, size)
    return img


def encode(img: np.ndarray, fmt: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
    else:
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_index(images) -> list[int]:
    """Sample indices of a batch made with mean 0, std 1 and an identity transform."""
    px = (images[:, 0].reshape(images.shape[0], -1)[:, :2] * 255.0).round().long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def write_synthetic(out_dir: str | Path, *, shard_sizes: list[int], val: int = 0, size: int = 8, channels: int = 1,
                    num_classes: int = 10, fmt: str = "png", seed: int = 0, overwrite: bool = False) -> Path:
    """Train shards of the given sizes (samples 0..N-1 in order), one val shard of `val` samples.

    Label of sample i is i % num_classes."""
    rng = np.random.default_rng(seed)
    n_train = sum(shard_sizes)
    arrays = [synthetic_image(i, size, channels, rng) for i in range(n_train + val)]
    recs = [Record(f"s{i:06d}", encode(a, fmt), fmt, i % num_classes, {"index": i}) for i, a in enumerate(arrays)]
    mean, std = image_stats(arrays[:n_train], channels)
    return write_dataset(out_dir, {"train": recs[:n_train], "val": recs[n_train:]}, name="synthetic",
                         classes=[str(c) for c in range(num_classes)], channels=channels, image_size=[size, size],
                         mean=mean, std=std, samples_per_shard=1 << 30, shard_bytes=DEFAULT_SHARD_BYTES,
                         overwrite=overwrite, source="synthetic", shard_sizes={"train": shard_sizes})
