"""Loading a checkpoint into a built Trainer, falling back to the previous one when it fails.

`--resume auto` tries `latest` (if complete), then every older complete checkpoint, newest first.
A candidate that fails to load for any reason (a file refused or unreadable, DeepSpeed failing,
a per-rank state file damaged) is named in one line and the previous one is tried; when none
loads, the run stops with one line naming the newest failure; it never loops. Under Slurm requeue
a damaged newest checkpoint therefore costs one checkpoint interval, never the job.

Every rank must take the same checkpoint: after each phase (files read as data, DeepSpeed's
load) the ranks agree with an all-reduce before going on, so one rank's damaged file makes all
of them move on together. Layout mismatches (another world size, another batch size) are user
errors that every older checkpoint shares: they stop at once, saying which option to use.
"""
from __future__ import annotations

from pathlib import Path

import torch

from distvit.checkpoint import io as ckio
from distvit.checkpoint import safe_load
from distvit.checkpoint import state as ckstate
from distvit.checkpoint.reshape import is_universal
from distvit.config import ConfigError
from distvit.parallel import comm


class ResumeError(ConfigError):
    pass


def _all_ok(ok: bool) -> bool:
    """True when every rank's `ok` is; a CPU flag, reduced on the group's device (comm: CUDA under NCCL)."""
    return comm.all_reduce(torch.tensor([0.0 if ok else 1.0]), "max").item() == 0.0


def check_layout(trainer, tag_dir: Path, meta: ckio.CheckpointMeta) -> None:
    mesh = trainer.mesh
    if not meta.is_reshaped and (meta.world_size != mesh.world_size or meta.sp_size != mesh.sp_size):
        raise ResumeError(
            f"checkpoint {tag_dir} was saved by {meta.world_size} ranks (sp={meta.sp_size}), "
            f"this run has {mesh.world_size} (sp={mesh.sp_size}); resume on the same world size, or with "
            f"--resume auto in the run that saved it (it reshapes by itself), or reshape it for any world size (`distvit ckpt reshape {tag_dir} --out <new run>/checkpoints`, then "
            f"--resume auto in that run), or consolidate it (`distvit ckpt consolidate`) and start from the "
            f"weights alone with --set model.checkpoint=FILE"
        )


def _read(trainer, tag_dir: Path) -> dict:
    """Phase 1: every file read as data (nothing executed), the rank's state parsed."""
    safe_load.precheck(tag_dir)
    if ckio.read_meta(tag_dir).is_reshaped:
        state = ckstate.load_common(tag_dir)
        state["data_note"] = _load_reshaped_data(trainer, state.get("data"))
        return state
    state = ckstate.load_rank(tag_dir, trainer.rank)
    try:
        trainer.train_loader.load_state_dict(state["data"])
    except Exception as exc:  # DataError: the saved data cursor does not fit this run's data settings
        raise ResumeError(
            f"{tag_dir}: {str(exc).split('. ')[0]}; to resume with the new settings, reshape it "
            f"(`distvit ckpt reshape {tag_dir} --out <new run>/checkpoints`, then --resume auto in that run: "
            f"weights, optimizer, schedule and the rest of the epoch's samples carry over, re-split for the new "
            f"settings), or restore the saved settings"
        ) from None
    return state


def _load_reshaped_data(trainer, data: dict | None) -> str:
    """The rest of the saved epoch over this run's ranks x workers (data/remap.py); when it cannot be
    carried (no cursor saved, another sample order, repeated augmentation), the epoch restarts."""
    from distvit.data.errors import DataError

    loader = trainer.train_loader
    if not data:
        return "the epoch restarts from its first batch (the checkpoint holds no data cursor)"
    try:
        loader.load_state_dict(data)
    except DataError as exc:
        return f"the epoch restarts from its first batch ({str(exc).split('; ')[0]})"
    return (f"epoch {loader.epoch} goes on with its {remap_left(loader)} unseen samples ({loader.epoch_steps()} "
            f"steps over {trainer.mesh.dp_size} dp rank(s) x {loader.num_workers} worker(s))")


def remap_left(loader) -> int:
    from distvit.data.shards import todo_length

    return todo_length(loader.state_dict()["todo"])


def _apply(trainer, tag_dir: Path, state: dict) -> None:
    """Phase 3: step, epoch, best, EMA and RNG (or, reshaped, a reseed)."""
    trainer.step, trainer.epoch, trainer.best = state["step"], state["epoch"], state["best"]
    if trainer.ema is not None and state.get("ema") is not None:
        trainer.ema.load_state_dict(state["ema"])
    meta = ckio.read_meta(tag_dir)
    if meta.is_reshaped:
        from distvit.engine.build import seed_all
        from distvit.parallel.mesh import log0

        # The RNG state the old ranks shared goes to every rank; none shared: a reseed from the step
        # (the same on every rank, as distvit's streams are; see checkpoint/reshape.py).
        if state.get("rng") is not None:
            ckstate.set_rng_state(*state["rng"], trainer.device)
            rng = "the RNG state carried over"
        else:
            seed_all(trainer.cfg.run.seed + 1_000_003 * trainer.step)
            rng = "the RNG reseeded from run.seed and the step (the old ranks' states differed or were not saved)"
        elastic = trainer.checkpoints.elastic_note
        log0((f"{elastic}: " if elastic else "") +
             f"resuming a checkpoint reshaped from {meta.reshaped_from.world_size} to "
             f"{trainer.mesh.world_size} rank(s): weights, optimizer and schedule carried over; "
             f"{state['data_note']}; {rng}")
        return
    scalars, tensors = state["rng"]
    ckstate.set_rng_state(scalars, tensors, trainer.device)


def try_load(trainer, tag_dir: Path) -> str | None:
    """Load `tag_dir` on every rank; None when all ranks did, else the first failure (one line)."""
    check_layout(trainer, tag_dir, ckio.read_meta(tag_dir))
    error, state = None, None
    try:
        state = _read(trainer, tag_dir)
    except ResumeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure moves on to the previous checkpoint
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not _all_ok(error is None):
        return error or "another rank could not read its files"
    try:
        load_path, _ = trainer.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            error = f"DeepSpeed could not load the checkpoint in {tag_dir}"
        elif is_universal(tag_dir) and trainer.cfg.parallel.zero_stage == 3:
            from distvit.checkpoint.zero3_universal import fix_loaded_state

            fix_loaded_state(trainer.engine, tag_dir)  # DeepSpeed 0.19: shared step tensor, first group's hyperparameters
    except Exception as exc:  # noqa: BLE001
        error = f"DeepSpeed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not _all_ok(error is None):
        return error or "DeepSpeed failed on another rank"
    _apply(trainer, tag_dir, state)
    return None


def load_first_good(trainer, candidates: list[Path], log) -> Path:
    """Try each candidate in order; the one loaded, or ResumeError when none loads."""
    universal = is_universal(candidates[0])
    # The engine was configured for the first candidate's kind (universal or not).
    candidates = [c for c in candidates if is_universal(c) == universal]
    failures = []
    for i, tag_dir in enumerate(candidates):
        error = try_load(trainer, tag_dir)
        if error is None:
            return tag_dir
        failures.append(error)
        nxt = candidates[i + 1] if i + 1 < len(candidates) else None
        log(f"resume: checkpoint {tag_dir} did not load ({error}); "
            + (f"trying the previous complete one, {nxt}" if nxt else "no older complete checkpoint is left"))
    raise ResumeError(
        f"no checkpoint could be loaded ({len(candidates)} tried; the newest failed with: {failures[0]}); "
        f"check them with `distvit ckpt verify {candidates[0].parent}`, or start over with --set run.name=<new name>"
    )


def clear_stale(trainer, tag_dir: Path, log) -> None:
    """Before saving at a step whose folder exists but is neither the one loaded nor written by this
    process (a damaged checkpoint the resume passed over): rank 0 removes it, all ranks wait."""
    import shutil

    from distvit.parallel import mesh as ddist

    stale = tag_dir.exists() and tag_dir != trainer.resume_from and tag_dir not in trainer.checkpoints.saved_tags
    # Every rank decides before rank 0 deletes: a rank that looked after the removal would skip the
    # barrier below and the two would wait on different collectives (seen as a hang).
    if comm.all_reduce(torch.tensor([float(stale)]), "max").item():
        if trainer.is_main:
            log(f"replacing {tag_dir}: it was not written by this run (a checkpoint the resume passed over)")
            shutil.rmtree(tag_dir, ignore_errors=True)
        ddist.barrier()
