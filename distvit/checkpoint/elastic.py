"""Elastic resume: `--resume auto` on a checkpoint saved by another world size reshapes it first.

A job requeued onto fewer (or more) nodes finds its newest checkpoint written by another number of
ranks (or another sp size). Instead of stopping with "resume on the same world size", rank 0 runs
`distvit ckpt reshape` on it into <checkpoints>/reshaped/<tag> (checkpoint/reshape.py: weights,
optimizer, schedule, the rest of the epoch's data and the RNG), every rank waits for it, and the
run resumes from that copy; the trainer logs one line saying so. The copy is kept while it is the
one in use (a second requeue before the next save reuses it) and replaced by the next reshape; the
run's own saves go on into <checkpoints>/step_* at the new world size, so the next restart on the
same size resumes from those directly.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from distvit.checkpoint import io as ckio
from distvit.checkpoint.reshape import reshape

RESHAPED_DIR = "reshaped"


def needs_reshape(meta: ckio.CheckpointMeta, mesh) -> bool:
    return not meta.is_reshaped and (meta.world_size, meta.sp_size) != (mesh.world_size, mesh.sp_size)


def _reusable(out_tag: Path, src: Path) -> bool:
    if not ckio.is_complete(out_tag):
        return False
    made_from = ckio.read_meta(out_tag).reshaped_from
    return made_from is not None and made_from.path == str(src.resolve())


def _reshape_on_rank0(src: Path, out_root: Path, is_main: bool) -> tuple[Path, str | None]:
    out_tag, error = out_root / src.name, None
    if is_main:
        try:
            if not _reusable(out_tag, src):
                if out_root.is_dir():  # one reshaped copy at a time: the one this run resumes from
                    for old in out_root.iterdir():
                        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
                reshape(src, out_root)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, then one line
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return out_tag, error


def _outcome_of_rank0(error: str | None, is_main: bool, world_size: int, name: str) -> str | None:
    """Rank 0's outcome (None: reshaped) on every rank. The others wait on the rendezvous store, not
    in a collective: reshaping a large model can outlast run.collective_timeout_s, and a rank 0 that
    dies meanwhile is still caught by the heartbeat watchdog (distvit/watchdog.py)."""
    from datetime import timedelta

    from distvit.parallel import mesh as ddist
    from distvit import watchdog

    store = ddist._store
    if world_size == 1 or store is None:  # one process, or a group made outside distvit.parallel.mesh.init
        from distvit.checkpoint.resume import _all_ok

        return None if _all_ok(error is None) else (error or "rank 0 could not reshape it (its log says why)")
    key = watchdog.key(f"elastic_reshape/{name}")
    if is_main:
        store.set(key, error or "")
        return error
    store.wait([key], timedelta(days=7))
    return store.get(key).decode() or None


def for_this_world(trainer, candidates: list[Path], log) -> tuple[list[Path], str | None]:
    """The checkpoints `--resume auto` tries, newest first, and a note for the resume line.

    Unchanged (note None) when the newest was saved by this world size. Otherwise the reshaped copy
    of the newest that reshapes; one that does not (damaged, refused) is named and the previous one
    tried, as resume.py does for loading; an older checkpoint of this world size is taken as it is."""
    from distvit.checkpoint.resume import ResumeError

    mesh = trainer.mesh
    failures = []
    for i, tag_dir in enumerate(candidates):
        meta = ckio.read_meta(tag_dir)
        if not needs_reshape(meta, mesh):
            return candidates[i:], None
        out_tag, error = _reshape_on_rank0(tag_dir, trainer.ckpt_root / RESHAPED_DIR, trainer.rank == 0)
        error = _outcome_of_rank0(error, trainer.rank == 0, mesh.world_size, tag_dir.name)
        if error is None:
            note = (f"elastic resume: {tag_dir} was saved by {meta.world_size} rank(s) (sp={meta.sp_size}), "
                    f"this run has {mesh.world_size} (sp={mesh.sp_size}); reshaped into {out_tag}")
            return [out_tag], note
        failures.append(error)
        nxt = candidates[i + 1] if i + 1 < len(candidates) else None
        log(f"elastic resume: {tag_dir} could not be reshaped for {mesh.world_size} rank(s) ({error}); "
            + (f"trying the previous complete one, {nxt}" if nxt else "no older complete checkpoint is left"))
    raise ResumeError(
        f"--resume auto: no checkpoint could be reshaped for this run's {mesh.world_size} rank(s) (sp={mesh.sp_size}) "
        f"({len(candidates)} tried; the newest failed with: {failures[0]}); check them with "
        f"`distvit ckpt verify {candidates[0].parent}`, resume on the world size that saved them, or start over "
        f"with --set run.name=<new name>")
