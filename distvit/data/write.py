"""Write webdataset shards (`{key}.png|jpg|webp` + `{key}.cls` + `{key}.json`) and their dataset.json.

    write_digits("data/digits")                       # sklearn's 8x8 digits, seeded 80/20 split, seconds
    write_imagefolder("photos/", "data/photos")       # photos/<class>/*.jpg, or photos/{train,val}/<class>/
    write_csv("list.csv", "data/list")                # rows: path,label[,split]

Shards go through webdataset's ShardWriter with a fixed mtime, so writing the same input twice gives
byte-identical shards (and sha256). Files found on disk are stored as they are (no re-encoding: the
loader decodes the original bytes). The manifest is written last and atomically; an existing output
is refused unless overwrite=True, and then its manifest is removed first, so an interrupted rewrite
never looks complete.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from distvit.data.errors import DataError, log
from distvit.data.manifest import MANIFEST_NAME, write_manifest
from distvit.data.transforms import IMAGE_EXTS

FIXED_MTIME = 946684800  # 2000-01-01: reproducible tar bytes
DEFAULT_SAMPLES_PER_SHARD = 1000
DEFAULT_SHARD_BYTES = 1 << 30


@dataclass
class Record:
    """One sample to write: encoded image bytes, its extension, the class index, provenance."""

    key: str
    image: bytes
    ext: str
    label: int
    meta: dict


def parse_size(text: str) -> int:
    """'64MB' -> 67108864 (KB/MB/GB are powers of 1024; a bare number is bytes)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ValueError(f"shard size '{text}' is not a size; use e.g. 500MB, 2GB or a byte count") from None
    if value < 1:
        raise ValueError(f"shard size '{text}' must be positive")
    return int(value)


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out_dir.iterdir() if p.name == MANIFEST_NAME or p.suffix == ".tar")
    if existing and not overwrite:
        raise DataError(f"output '{out_dir}' already holds {', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''}; "
                        f"pass --overwrite (overwrite=True) to replace it, or choose another --out")
    # Manifest first: from here until the new one is written the folder does not look complete.
    for name in existing:
        (out_dir / name).unlink()


def write_split(records: Iterable[Record], out_dir: Path, split: str, *, samples_per_shard: int,
                shard_bytes: int, progress: Callable[[int], None] | None = None,
                shard_sizes: list[int] | None = None) -> dict:
    """Shards `{split}-000000.tar ...` in out_dir; returns the manifest's split entry.

    `shard_sizes` (tests, benchmarks) gives each shard's sample count explicitly."""
    from webdataset import ShardWriter

    shards: list[dict] = []
    in_shard = [0]  # samples written to the open shard

    def finished(fname: str) -> None:  # ShardWriter calls this as it closes each shard
        digest = hashlib.sha256()
        with open(fname, "rb") as f:  # in chunks: a shard may be gigabytes
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        shards.append({"name": os.path.basename(fname), "samples": in_shard[0], "bytes": os.path.getsize(fname),
                       "sha256": digest.hexdigest()})
        in_shard[0] = 0

    pattern = str(out_dir / f"{split}-%06d.tar")
    writer = ShardWriter(pattern, maxcount=samples_per_shard, maxsize=shard_bytes, post=finished,
                         verbose=0, encoder=False, mtime=FIXED_MTIME)
    try:
        for rec in records:
            if shard_sizes and len(shards) < len(shard_sizes) and in_shard[0] == shard_sizes[len(shards)]:
                writer.next_stream()
            meta = json_bytes(rec.meta)
            writer.write({"__key__": rec.key, rec.ext: rec.image, "cls": str(rec.label).encode(), "json": meta})
            in_shard[0] += 1
            if progress:
                progress(1)
    finally:
        writer.close()
    if shards and shards[-1]["samples"] == 0:  # ShardWriter opens its first shard before any write
        (out_dir / shards.pop()["name"]).unlink(missing_ok=True)
    total = sum(s["samples"] for s in shards)
    last = len(shards) - 1
    return {"pattern": f"{split}-{{000000..{last:06d}}}.tar" if shards else None, "samples": total, "shards": shards}


def json_bytes(obj: dict) -> bytes:
    import json

    return json.dumps(obj, sort_keys=True).encode()


def image_stats(arrays: Iterable[np.ndarray], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel values in [0, 1] (accumulated in float64)."""
    s = np.zeros(channels)
    s2 = np.zeros(channels)
    n = 0
    for a in arrays:
        a = a.reshape(-1, channels).astype(np.float64) / 255.0
        s += a.sum(0)
        s2 += (a * a).sum(0)
        n += a.shape[0]
    if n == 0:
        return [0.5] * channels, [0.5] * channels
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 1e-12))
    return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]


def write_dataset(out_dir: str | Path, splits: dict[str, list[Record]], *, name: str, classes: list[str],
                  channels: int, image_size: list[int] | None, mean: list[float], std: list[float],
                  samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  overwrite: bool = False, source: str = "", show_progress: bool = False,
                  shard_sizes: dict[str, list[int]] | None = None) -> Path:
    out = Path(out_dir)
    prepare_output(out, overwrite)
    manifest_splits = {}
    for split, records in splits.items():
        bar = _bar(len(records), f"writing {split}", show_progress)
        manifest_splits[split] = write_split(records, out, split, samples_per_shard=samples_per_shard,
                                             shard_bytes=shard_bytes, progress=bar.update if bar else None,
                                             shard_sizes=(shard_sizes or {}).get(split))
        if bar:
            bar.close()
    return write_manifest(out, {
        "name": name, "source": source, "classes": classes, "num_classes": len(classes),
        "image_size": image_size, "channels": channels, "mean": mean, "std": std, "splits": manifest_splits,
    })


def _bar(total: int, desc: str, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img")


# ------------------------------------------------------------------------------------ sources


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def write_digits(out_dir: str | Path, *, samples_per_shard: int = 500, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 val_fraction: float = 0.2, seed: int = 0, overwrite: bool = False, show_progress: bool = False,
                 classes: int = 10) -> Path:
    """sklearn's 8x8 digits (1797 images, no download) as grayscale PNG shards; returns the manifest path.

    classes=N keeps the digits 0..N-1 only (e.g. 5: the fine-tuning demo, configs/finetune_digits.yaml)."""
    if not 2 <= classes <= 10:
        raise ValueError(f"--classes {classes}: digits has the classes 0-9; give 2 to 10")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    idx = np.flatnonzero(digits.target < classes)
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target[idx])
    splits = {}
    for split, ids in (("train", np.sort(train_idx)), ("val", np.sort(val_idx))):
        splits[split] = [Record(f"{split}_{i:06d}", png_bytes(pixels[i]), "png", int(digits.target[i]),
                                {"index": int(i)}) for i in ids]
    mean, std = image_stats((pixels[i] for i in train_idx), 1)
    return write_dataset(out_dir, splits, name="digits", classes=[str(c) for c in range(classes)], channels=1,
                         image_size=[8, 8], mean=mean, std=std, samples_per_shard=samples_per_shard,
                         shard_bytes=shard_bytes, overwrite=overwrite, source="sklearn.datasets.load_digits",
                         show_progress=show_progress)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)


def _split_items(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(items) * val_fraction))
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def _val_note(where: str, n_val: int, n_total: int, val_fraction: float, seed: int, how: str) -> None:
    """One line: the writer made a val split itself (it used to do so silently)."""
    if n_val:
        log.warning("no val split in %s: took %d of %d images (--val-fraction %g, seeded by --seed %d) as val; "
                    "to provide one, %s (or --val-fraction 0 for no val)", where, n_val, n_total, val_fraction, seed, how)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def write_imagefolder(src: str | Path, out_dir: str | Path, *, val_fraction: float = 0.1, seed: int = 0,
                      stats_samples: int = 2000, workers: int = 1, **kw) -> Path:
    """src/<class>/*.{jpg,png,webp} (val_fraction of it becomes val), or src/train/<class>/ (+ src/val/<class>/).

    Streams: the images are read by the shard writers (`workers` processes), never held together."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"imagefolder source '{src}' is not a directory; give a folder with one subfolder per class")
    top = {p.name for p in src.iterdir() if p.is_dir()}
    # train/ (+ val/) holding class folders; train/ alone counts only when nothing but split names sits beside it
    has_train = ("train" in top and any(p.is_dir() for p in (src / "train").iterdir())
                 and ("val" in top or top <= {"train", "val", "test"}))
    has_val = has_train and "val" in top
    base = src / "train" if has_train else src
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"imagefolder source '{base}' has no class subfolders; expected {base}/<class>/<image>.jpg")
    index = {c: i for i, c in enumerate(classes)}

    def items_of(folder: Path) -> list[tuple[str, int]]:
        out = []
        for c in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            if c not in index:
                raise DataError(f"class folder '{folder / c}' is not among the train classes {classes[:5]}...; "
                                f"val and train must have the same class folders")
            out += [(_rel(p, src), index[c]) for p in _image_files(folder / c)]
        return out

    if has_val:
        train, val = items_of(src / "train"), items_of(src / "val")
    else:
        train, val = _split_items(items_of(base), val_fraction, seed)
        _val_note(f"'{src}'", len(val), len(train) + len(val), val_fraction, seed,
                  f"put the images in {src}/train/<class>/ and {src}/val/<class>/")
    if not train:
        raise DataError(f"imagefolder source '{src}' holds no images with extensions {', '.join(IMAGE_EXTS)}")
    from distvit.data.write_files import write_file_dataset

    return write_file_dataset(out_dir, src, {"train": train, "val": val}, name=src.name, classes=classes,
                              source=f"imagefolder {src}", workers=workers, seed=seed, stats_samples=stats_samples,
                              **_writer_kw(kw))


def _writer_kw(kw: dict) -> dict:
    out = {"samples_per_shard": DEFAULT_SAMPLES_PER_SHARD, "shard_bytes": DEFAULT_SHARD_BYTES, "overwrite": False,
           "show_progress": False}
    unknown = set(kw) - set(out)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {**out, **kw}


def write_csv(csv_path: str | Path, out_dir: str | Path, *, val_fraction: float = 0.1, seed: int = 0,
              stats_samples: int = 2000, workers: int = 1, **kw) -> Path:
    """Rows `path,label[,split]` (a header row is allowed); paths relative to the CSV's folder.

    Labels that are all integers are class indices; otherwise class names (sorted -> indices)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"csv source '{csv_path}' does not exist")
    root = csv_path.parent
    rows = []
    with open(csv_path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or row[0].startswith("#"):
                continue
            if lineno == 1 and row[0].strip().lower() in ("path", "file", "filename", "image"):
                continue
            if len(row) < 2:
                raise DataError(f"{csv_path}:{lineno}: expected 'path,label[,split]', got {row}")
            split = row[2].strip() if len(row) > 2 and row[2].strip() else None
            if split not in (None, "train", "val"):
                raise DataError(f"{csv_path}:{lineno}: split must be train or val, got '{split}'")
            path = Path(row[0].strip())
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise DataError(f"{csv_path}:{lineno}: image '{path}' does not exist")
            rows.append((_rel(path, root), row[1].strip(), split))
    if not rows:
        raise DataError(f"csv source '{csv_path}' has no rows")
    labels = {r[1] for r in rows}
    if all(lab.isdigit() for lab in labels):
        classes = [str(i) for i in range(max(int(x) for x in labels) + 1)]
        to_index = {lab: int(lab) for lab in labels}
    else:
        classes = sorted(labels)
        to_index = {c: i for i, c in enumerate(classes)}
    if any(s is not None for _, _, s in rows):
        train = [(p, to_index[lab]) for p, lab, s in rows if s != "val"]
        val = [(p, to_index[lab]) for p, lab, s in rows if s == "val"]
    else:
        train, val = _split_items([(p, to_index[lab]) for p, lab, _ in rows], val_fraction, seed)
        _val_note(f"'{csv_path}' (no split column)", len(val), len(rows), val_fraction, seed,
                  "add a third column train|val to every row")
    del rows
    from distvit.data.write_files import write_file_dataset

    return write_file_dataset(out_dir, root, {"train": train, "val": val}, name=csv_path.stem, classes=classes,
                              source=f"csv {csv_path}", workers=workers, seed=seed, stats_samples=stats_samples,
                              **_writer_kw(kw))
