"""Checkpoint files on disk: atomic writes, the `latest` pointer, completeness, resume and pruning.

Layout of a run's checkpoints (DeepSpeed writes the model/optimizer shards inside each tag):

    runs/<name>/checkpoints/
        latest                      text: the tag of the newest *complete* checkpoint
        step_00000100/              DeepSpeed's files (mp_rank_*, zero_pp_rank_*_optim_states.pt)
            distvit_rank00000.json  per-rank state (checkpoint/state.py): step, data cursor, RNG scalars
            distvit_rank00000.safetensors   per-rank tensors: torch/numpy RNG, EMA weights
            distvit.json            step, epoch, world size, ZeRO stage, resolved config
            COMPLETE                written last: JSON manifest, every file's size and sha256

A checkpoint is complete only when COMPLETE exists; `latest` moves only after that, so a kill
during a save leaves `latest` on the previous complete checkpoint. DeepSpeed's own `latest`
file is not used (we save with save_latest=False) because it is written before our per-rank
state and would point at a checkpoint that may never finish.
COMPLETE lists every file's size (checked whenever completeness is asked) and sha256 (checked by
`distvit ckpt verify`), so a file truncated or damaged after the save is not taken as complete.
Files are created with the user's umask (mkstemp's 0600 is widened), and a full disk is one line
naming the folder, the bytes needed and the bytes free (`save_failed`: torch's C++ writer reports it
as a RuntimeError without an errno); `latest` stays on the last complete checkpoint.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from distvit.checkpoint.meta import META, CheckpointMeta, read_meta, read_meta_if_any  # noqa: F401 (the file protocol's face)

LATEST = "latest"
COMPLETE = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(rank: int) -> str:
    """The JSON half of a rank's state (the tensors are beside it, see checkpoint/state.py)."""
    return f"distvit_rank{rank:05d}.json"


def rank_state_files(rank: int) -> list[str]:
    return [f"distvit_rank{rank:05d}.json", f"distvit_rank{rank:05d}.safetensors"]


class DiskFullError(OSError):
    """No space left while writing a checkpoint: the message names the folder, the bytes needed and free."""

    def __str__(self) -> str:  # the sentence alone, without OSError's "[Errno 28]"
        return self.strerror or super().__str__()


# How torch's C++ zip writer (torch.save, DeepSpeed's checkpoint engine) reports a write that failed:
# the errno is lost, a full disk reads "basic_ios::clear: iostream error", "PytorchStreamWriter failed
# writing file ...: file write failed" or, at the end of the archive, "unexpected pos N vs M".
TORCH_WRITE_FAILED = ("iostream error", "PytorchStreamWriter failed", "file write failed", "unexpected pos")


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _no_space(exc: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(exc))


def write_failed(exc: BaseException) -> bool:
    """exc (or one it was raised while handling) is a failed write: ENOSPC/EDQUOT, or torch's writer failing."""
    return _no_space(exc) or any(isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_WRITE_FAILED)
                                 for e in _chain(exc))


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the filesystem holding folder (its nearest existing parent), None if unknown."""
    folder = Path(folder)
    probe = next((p for p in [folder, *folder.parents] if p.exists()), None)
    try:
        return shutil.disk_usage(probe).free if probe is not None else None
    except OSError:
        return None


def disk_full(folder: Path, needed: int | None, *, basis: str | None = None, free: int | None = None,
              free_before: int | None = None) -> DiskFullError:
    """The one-line error for a full disk under a checkpoint folder; basis says where `needed` comes from."""
    folder = Path(folder)
    free = free_bytes(folder) if free is None else free
    need = f"{needed} bytes" if needed is not None else "more space"
    if needed is not None and basis:
        need += f" ({basis})"
    root = folder.parent if step_of(folder.name) is not None else folder
    latest = read_latest(root) if root.is_dir() else None
    had = f" ({free_before} when the save began)" if free_before is not None and free_before != free else ""
    return DiskFullError(
        errno.ENOSPC,
        f"disk full writing a checkpoint in {folder}: it needs {need}"
        + (f", {free} bytes are free{had}" if free is not None else "")
        + f"; free space there, lower checkpoint.keep or point run.output_dir at a larger disk (the last "
        f"complete checkpoint, {latest or 'none yet'}, stays `latest`)",
        str(folder),
    )


class CheckpointWriteError(OSError):
    """torch's writer failed with room on the disk (a folder removed while writing, an I/O error)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


ROOMY = 64 << 20  # free bytes beyond which a write failure without an errno is not called a full disk


def save_failed(folder: Path, exc: BaseException, *, needed: int | None = None, basis: str | None = None,
                free: int | None = None, free_before: int | None = None) -> OSError | None:
    """The one-line error for a checkpoint write that failed with exc, or None if exc is not a failed write.

    ENOSPC/EDQUOT is a full disk. torch's C++ writer loses the errno: its failure is a full disk when
    what is left free (measured before anything written is removed) is under what the save needs
    (or 64 MiB when that is not known), and otherwise a write error that says how much is free."""
    if not write_failed(exc):
        return None
    free = free_bytes(folder) if free is None else free
    if not _no_space(exc) and free is not None and free >= max(needed or 0, ROOMY):
        text = next(str(e) for e in _chain(exc) if isinstance(e, RuntimeError))
        return CheckpointWriteError(
            errno.EIO, f"writing a checkpoint in {folder} failed (torch: {' '.join(text.split())[:120]}) with "
            f"{free} bytes free, so not for lack of space; check that the folder still exists and the filesystem "
            f"is healthy (the last complete checkpoint stays `latest`)")
    return disk_full(folder, needed, basis=basis, free=free, free_before=free_before)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets while it reads: racy with threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(tmp: str) -> None:
    """mkstemp creates 0600; a checkpoint gets the permissions any file the user creates gets."""
    os.chmod(tmp, 0o666 & ~_umask())


def make_temp(path: Path) -> str:
    """A temp file beside `path` (same filesystem, so os.replace is atomic), with the user's umask."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    apply_umask(tmp)
    return tmp


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
    tmp = make_temp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(exc, DiskFullError) and _no_space(exc):
            raise disk_full(path.parent, len(data)) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path, *, zipfile: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp(path)
    try:
        torch.save(obj, tmp, _use_new_zipfile_serialization=zipfile)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        failed = None if isinstance(exc, DiskFullError) else save_failed(path.parent, exc)  # before the unlink
        Path(tmp).unlink(missing_ok=True)
        if failed is not None:
            raise failed from None
        raise
    _fsync_dir(path.parent)


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def build_manifest(tag_dir: Path) -> dict:
    """{relative path: [size, sha256]} of every file in the checkpoint (temp files and COMPLETE aside)."""
    tag_dir = Path(tag_dir)
    files = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != COMPLETE and not p.name.endswith(".tmp"):
            files[str(p.relative_to(tag_dir))] = [p.stat().st_size, sha256(p)]
    return files


def read_manifest(tag_dir: Path) -> dict | None:
    """COMPLETE's file list, or None for a checkpoint written before manifests (an empty COMPLETE)."""
    try:
        text = (Path(tag_dir) / COMPLETE).read_text().strip()
    except OSError:
        return None
    if not text:
        return None
    try:
        return json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return {}  # a damaged marker: nothing matches it


def manifest_problems(tag_dir: Path, *, hashes: bool = False) -> list[str]:
    """Files that differ from the manifest: missing, another size, (hashes=True) other bytes."""
    tag_dir = Path(tag_dir)
    files = read_manifest(tag_dir)
    if files is None:
        return []
    if not files:
        return [f"{tag_dir / COMPLETE}: damaged (not the JSON manifest distvit writes)"]
    problems = []
    for name, (size, digest) in files.items():
        f = tag_dir / name
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != size:
            problems.append(f"{f}: {f.stat().st_size} bytes, the save wrote {size} (truncated or replaced)")
        elif hashes and sha256(f) != digest:
            problems.append(f"{f}: contents differ from what the save wrote (sha256 mismatch)")
    return problems


def is_complete(tag_dir: Path) -> bool:
    """COMPLETE and distvit.json present, and every file the manifest lists has its saved size."""
    tag_dir = Path(tag_dir)
    return (tag_dir / COMPLETE).is_file() and (tag_dir / META).is_file() and not manifest_problems(tag_dir)


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


def mark_complete(tag_dir: Path, meta: CheckpointMeta) -> None:
    """Rank 0, after every rank's files are on disk: write the metadata, then COMPLETE, then latest."""
    tag_dir = Path(tag_dir)
    atomic_write_text(tag_dir / META, meta.to_json())
    atomic_write_text(tag_dir / COMPLETE, json.dumps({"files": build_manifest(tag_dir)}, indent=1))
    atomic_write_text(tag_dir.parent / LATEST, tag_dir.name)


def find_resume(root: Path, log=print) -> Path | None:
    """The checkpoint `--resume auto` takes: `latest` if complete, else the newest complete one."""
    found = resume_candidates(root, log)
    return found[0] if found else None


def resume_candidates(root: Path, log=print) -> list[Path]:
    """What `--resume auto` tries, in order: `latest` if complete, then every other complete
    checkpoint, newest first (the trainer moves on to the next when one fails to load)."""
    root = Path(root)
    latest = read_latest(root)
    complete = complete_checkpoints(root)[::-1]
    if latest is not None:
        candidate = root / latest
        if candidate in complete:
            return [candidate] + [p for p in complete if p != candidate]
        log(f"checkpoint '{candidate}' named by {root / LATEST} is incomplete or missing; "
            "falling back to the newest complete checkpoint")
        if complete:
            log(f"resuming from '{complete[0]}' instead")
    return complete


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
                f"--resume {arg}: checkpoint is incomplete (no {COMPLETE} marker, or a file is not the size the save "
                f"wrote: `distvit ckpt verify {arg}` names it); "
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
