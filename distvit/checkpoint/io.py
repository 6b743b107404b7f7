"""Checkpoint files on disk: atomic writes, the `latest` pointer, completeness, resume and pruning.

Layout of a run's checkpoints (DeepSpeed writes the model/optimizer shards inside each tag):

    runs/<name>/checkpoints/
        latest                      text: the tag of the newest *complete* checkpoint
        step_00000100/              DeepSpeed's files (mp_rank_*, zero_pp_rank_*_optim_states.pt)
            distvit_rank00000.pt    per-rank state: RNG (python, numpy, torch, device), data cursor
            distvit.json            step, epoch, world size, ZeRO stage, resolved config
            COMPLETE                written last, after every rank finished its files

A checkpoint is complete only when COMPLETE exists; `latest` moves only after that, so a kill
during a save leaves `latest` on the previous complete checkpoint. DeepSpeed's own `latest`
file is not used (we save with save_latest=False) because it is written before our per-rank
state and would point at a checkpoint that may never finish.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"
COMPLETE = "COMPLETE"
META = "distvit.json"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(rank: int) -> str:
    return f"distvit_rank{rank:05d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename over it: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file() and (tag_dir / META).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Tag folders under root, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(tags, key=lambda p: step_of(p.name))


def complete_checkpoints(root: Path) -> list[Path]:
    return [p for p in list_checkpoints(root) if is_complete(p)]


def read_latest(root: Path) -> str | None:
    f = Path(root) / LATEST
    return f.read_text().strip() if f.is_file() else None


def mark_complete(tag_dir: Path, meta: dict) -> None:
    """Rank 0, after every rank's files are on disk: write the metadata, then COMPLETE, then latest."""
    tag_dir = Path(tag_dir)
    atomic_write_text(tag_dir / META, json.dumps(meta, indent=2, sort_keys=True))
    atomic_write_text(tag_dir / COMPLETE, "")
    atomic_write_text(tag_dir.parent / LATEST, tag_dir.name)


def read_meta(tag_dir: Path) -> dict:
    return json.loads((Path(tag_dir) / META).read_text())


def find_resume(root: Path, log=print) -> Path | None:
    """The checkpoint `--resume auto` takes: `latest` if complete, else the newest complete one."""
    root = Path(root)
    latest = read_latest(root)
    if latest is not None:
        candidate = root / latest
        if is_complete(candidate):
            return candidate
        log(f"checkpoint '{candidate}' named by {root / LATEST} is incomplete or missing; "
            "falling back to the newest complete checkpoint")
    complete = complete_checkpoints(root)
    if complete:
        if latest is not None:
            log(f"resuming from '{complete[-1]}' instead")
        return complete[-1]
    return None


def resolve_resume(arg: str, root: Path, log=print) -> Path | None:
    """`auto` -> find_resume(root) (None when the run has no checkpoint yet); a path -> that tag dir.

    A path may be a tag folder or a checkpoints folder (then its latest complete tag).
    """
    if arg == "auto":
        return find_resume(root, log)
    p = Path(arg)
    if p.is_dir() and step_of(p.name) is not None:
        if not is_complete(p):
            raise FileNotFoundError(
                f"--resume {arg}: checkpoint is incomplete (no {COMPLETE} marker: the save was interrupted); "
                f"use --resume auto to take the newest complete one"
            )
        return p
    if p.is_dir():
        found = find_resume(p, log)
        if found is None:
            raise FileNotFoundError(f"--resume {arg}: no complete checkpoint (step_* folder with {COMPLETE}) in that folder")
        return found
    raise FileNotFoundError(f"--resume {arg}: no such checkpoint folder; give a step_* folder, its parent, or 'auto'")


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than them.

    Never deletes the checkpoint `latest` names. Returns what was deleted.
    """
    if keep <= 0:
        return []
    complete = complete_checkpoints(root)
    kept = set(complete[-keep:])
    latest = read_latest(root)
    oldest_kept = min((step_of(p.name) for p in kept), default=None)
    removed = []
    for p in list_checkpoints(root):
        if p in kept or p.name == latest:
            continue
        if is_complete(p) or (oldest_kept is not None and step_of(p.name) < oldest_kept):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
