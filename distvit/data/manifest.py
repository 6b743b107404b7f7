"""dataset.json: the manifest written beside the shards (last, atomically, so its presence means complete).

    {"format": "distvit-shards/1", "name": "digits", "classes": ["0", ...], "num_classes": 10,
     "image_size": [8, 8], "channels": 1, "mean": [0.3], "std": [0.4],
     "samples": {"train": 1437, "val": 360},
     "splits": {"train": {"pattern": "train-{000000..000002}.tar", "samples": 1437,
                          "shards": [{"name": "train-000000.tar", "samples": 500, "bytes": 123, "sha256": "..."}]}}}

The loader needs per-shard sample counts to give every rank the same number of steps without reading
the data first; the manifest is where they come from (shards from other tools: counted from the tar
headers instead, or `distvit data verify PATTERN --write-manifest`).
"""
from __future__ import annotations

import fnmatch
import json
import os
import posixpath
from pathlib import Path
from urllib.parse import urlparse

from distvit.data.errors import DataError

MANIFEST_NAME = "dataset.json"
FORMAT = "distvit-shards/1"


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def _first_url(path_or_pattern: str) -> str:
    from webdataset.shardlists import expand_urls

    return expand_urls(path_or_pattern.split("::")[0])[0]


def manifest_location(path_or_pattern: str) -> str | None:
    """Where the manifest for a shard pattern (or a directory, or the manifest itself) would be."""
    if path_or_pattern.endswith(".json"):
        return path_or_pattern
    if is_local(path_or_pattern) and os.path.isdir(local_path(path_or_pattern)):
        return os.path.join(local_path(path_or_pattern), MANIFEST_NAME)
    first = _first_url(path_or_pattern)
    if is_local(first):
        return os.path.join(os.path.dirname(local_path(first)) or ".", MANIFEST_NAME)
    if urlparse(first).scheme in ("http", "https", "gs", "s3", "ais"):
        return posixpath.join(posixpath.dirname(first), MANIFEST_NAME)
    return None  # pipe: commands: no place to guess; give data.manifest explicitly


def read_manifest(path_or_pattern: str) -> dict | None:
    """The dataset.json for a shard pattern, a directory, or a .json path; None when there is none."""
    where = manifest_location(path_or_pattern)
    if where is None:
        return None
    if is_local(where):
        p = Path(local_path(where))
        if not p.is_file():
            return None
        text = p.read_text()
    else:
        from webdataset.gopen import gopen

        try:
            with gopen(where, "rb") as f:
                text = f.read().decode()
        except Exception:  # a remote directory without a manifest: count from the shards instead
            return None
        if not text.strip():
            return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"manifest '{where}' is not valid JSON ({exc}); rewrite it with `distvit data write` "
                        f"or `distvit data verify PATTERN --write-manifest`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"manifest '{where}' is not a {FORMAT} manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r}); "
                        f"remove it or rewrite it with `distvit data verify PATTERN --write-manifest`")
    return manifest


def shard_counts(manifest: dict | None) -> dict[str, int]:
    """Samples per shard file name, over all splits."""
    counts: dict[str, int] = {}
    for split in (manifest or {}).get("splits", {}).values():
        for shard in split.get("shards", []):
            counts[shard["name"]] = int(shard["samples"])
    return counts


def missing_from_manifest(pattern: str, urls: list[str], manifest: dict | None) -> list[str]:
    """Shards the manifest lists for this pattern's folder and name pattern that are not on disk (deleted)."""
    if not manifest or not urls or not is_local(urls[0]):
        return []
    folder = os.path.dirname(local_path(urls[0]))
    names = {os.path.basename(local_path(u)) for u in urls}
    globs = [os.path.basename(local_path(part)) for part in pattern.split("::")]
    out = []
    for split in manifest.get("splits", {}).values():
        for s in split.get("shards", []):
            name = s["name"]
            if name in names or not any(fnmatch.fnmatch(name, g) for g in globs):
                continue
            if not os.path.exists(os.path.join(folder, name)):
                out.append(f"{os.path.join(folder, name)}: missing (the manifest lists it with {s['samples']} samples); "
                           f"restore the file, or rewrite the shards with `distvit data write`")
    return out


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    from distvit.checkpoint.io import atomic_write_text

    manifest = {"format": FORMAT, **manifest}
    manifest["samples"] = {name: split["samples"] for name, split in manifest.get("splits", {}).items()}
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    os.chmod(path, 0o644)  # the temp file behind the atomic write is private
    return path
