"""CheckpointManager: the trainer's saves, synchronous or in the background (`checkpoint.async`).

    manager = CheckpointManager(trainer)   # after the DeepSpeed engine is built
    tag_dir = manager.save()               # at a save step
    manager.finish()                       # at the end: every write durable, COMPLETE and latest written

Both paths write the same files in the same order (docs/design.md, "Checkpoints"): DeepSpeed's
shards and each rank's `distvit_rankNNNNN.{safetensors,json}`, then rank 0 writes `distvit.json`,
`COMPLETE` and `latest`. The synchronous path waits at barriers; the async one copies the state to
host memory and leaves the writing to a thread (checkpoint/async_save.py).
"""
from __future__ import annotations

import copy
from pathlib import Path

from distvit.checkpoint import async_save, elastic
from distvit.checkpoint import io as ckio
from distvit.checkpoint import resume as ckresume
from distvit.checkpoint import state as ckstate
from distvit.config import ConfigError
from distvit.engine import faults
from distvit.parallel import mesh as ddist
from distvit.parallel.mesh import log0


class CheckpointManager:
    """The trainer's checkpoints: which one to resume (resolve), loading it (load), saving (save, sync
    or async), the end of training (finish) and the consolidated export (export)."""

    def __init__(self, trainer, *, is_async: bool | None = None):
        self.t = trainer
        self.is_async = bool(getattr(trainer.cfg.checkpoint, "async")) if is_async is None else is_async
        self.saved_tags: set[Path] = set()  # written by this process (a re-save of one is skipped)
        self.candidates: list[Path] = []  # --resume auto: complete checkpoints, newest first
        self.elastic_note: str | None = None  # set when --resume auto reshaped for another world size
        self._writer: async_save.Writer | None = None
        self._snapshots: async_save.SnapshotCheckpointEngine | None = None

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume (before the engine exists: a reshaped one changes how it is built)."""
        t = self.t
        if resume:
            if resume == "auto":  # the newest first; load() moves on when one fails to load
                self.candidates = ckio.resume_candidates(t.ckpt_root, log=log0)
                found = self.candidates[0] if self.candidates else None
                if found is not None:  # saved by another world size: reshape it first (checkpoint/elastic.py)
                    self.candidates, self.elastic_note = elastic.for_this_world(t, self.candidates, log0)
                    found = self.candidates[0]
            else:
                found = ckio.resolve_resume(resume, t.ckpt_root, log=log0)
            if found is None:
                log0(f"--resume {resume}: no complete checkpoint in {t.ckpt_root} yet; starting from scratch")
            return found
        if ckio.list_checkpoints(t.ckpt_root):
            raise ConfigError(
                f"run folder '{t.run_dir}' already holds checkpoints; continue it with --resume auto, "
                f"or start a new run with --set run.name=<new name> (nothing was overwritten)"
            )
        return None

    def attach(self) -> None:
        """Once the engine exists: with checkpoint.async, its checkpoint engine snapshots instead of writing."""
        if self.is_async:
            engine = self.t.engine
            self._snapshots = async_save.SnapshotCheckpointEngine(engine.checkpoint_engine)
            engine.checkpoint_engine = self._snapshots
            self._writer = async_save.Writer()

    def load(self, tag_dir: Path) -> Path:
        """Load tag_dir; under --resume auto, fall back to older complete checkpoints (checkpoint/resume.py).
        Returns the one that loaded."""
        candidates = self.candidates if self.candidates[:1] == [tag_dir] else [tag_dir]
        return ckresume.load_first_good(self.t, candidates, log0)

    def export(self, tag_dir: Path) -> Path:
        """Consolidate the final checkpoint to fp32 safetensors that models.create(..., checkpoint=) loads."""
        from distvit.checkpoint.consolidate import consolidate

        out = self.t.run_dir / "model.safetensors"
        ddist.barrier()
        if self.t.is_main:
            consolidate(tag_dir, out, overwrite=True)
        ddist.barrier()
        return out

    def _meta(self) -> ckio.CheckpointMeta:
        t = self.t
        return ckio.CheckpointMeta(
            step=t.step, epoch=t.epoch, world_size=t.mesh.world_size, dp_size=t.mesh.dp_size, sp_size=t.mesh.sp_size,
            zero_stage=t.cfg.parallel.zero_stage, model=t.cfg.model.name, precision=t.precision,
            config=t.cfg.model_dump(mode="json"),
        )

    def save(self) -> Path:
        t = self.t
        if self.is_async:
            self.wait()  # the previous write is durable (and, on rank 0, marked) on every rank
        tag_dir = t.ckpt_root / ckio.tag_for_step(t.step)
        if (tag_dir in self.saved_tags or tag_dir == t.resume_from) and ckio.is_complete(tag_dir):
            return tag_dir
        ckresume.clear_stale(t, tag_dir, log0)
        free_before = ckio.free_bytes(t.ckpt_root)
        try:
            t.engine.save_checkpoint(str(t.ckpt_root), tag=tag_dir.name, save_latest=False,
                                     client_state={"distvit_step": t.step, "distvit_epoch": t.epoch})
            fields, tensors = ckstate.rank_state(step=t.step, epoch=t.epoch, best=t.best,
                                                 data=t.train_loader.state_dict(), device=t.device, ema=t.ema)
            self.saved_tags.add(tag_dir)
            if self.is_async:
                self._submit(tag_dir, copy.deepcopy(fields), async_save.snapshot(tensors))
                return tag_dir
            ckstate.save(tag_dir, ckstate.rank_stem(t.rank), fields, tensors)
        except Exception as exc:
            self._raise_if_disk_full(tag_dir, exc, free_before)
            raise
        faults.maybe_kill("crash_in_save", t.step)
        ddist.barrier()
        if t.is_main:
            try:
                ckio.mark_complete(tag_dir, self._meta())
            except Exception as exc:
                self._raise_if_disk_full(tag_dir, exc, free_before)
                raise
            ckio.prune(t.ckpt_root, t.cfg.checkpoint.keep)
        ddist.barrier()
        return tag_dir

    def _raise_if_disk_full(self, tag_dir: Path, exc: BaseException, free_before: int | None) -> None:
        """A failed write becomes the one-line error (checkpoint/io.py, save_failed) with what the
        checkpoint needs; `latest` has not moved. torch's writer reports a full disk as a RuntimeError
        ("basic_ios::clear: iostream error", "unexpected pos"), an atomic write as ENOSPC."""
        needed, basis = self.bytes_needed(exclude=tag_dir)
        failed = ckio.save_failed(tag_dir, exc, needed=needed, basis=basis, free_before=free_before)
        if failed is not None:
            raise failed from None

    def bytes_needed(self, exclude: Path | None = None) -> tuple[int | None, str | None]:
        """What one checkpoint takes on disk: the previous complete one's size, or, before the first,
        this run's model and optimizer state (every rank's, as the ZeRO stage spreads it)."""
        prev = [p for p in ckio.complete_checkpoints(self.t.ckpt_root) if p != exclude]
        if prev:
            size = sum(f.stat().st_size for f in prev[-1].rglob("*") if f.is_file())
            return size, f"the size of {prev[-1].name}"
        try:
            return state_bytes(self.t.engine, self.t.mesh.world_size, self.t.cfg.parallel.zero_stage), \
                "the model and optimizer state"
        except Exception:  # an estimate only: never hide the error it is for
            return None, None

    def _submit(self, tag_dir: Path, fields: dict, tensors: dict) -> None:
        t = self.t
        files = self._snapshots.take()
        meta, step, rank, world = self._meta(), t.step, t.rank, t.mesh.world_size
        is_main, keep, root = t.is_main, t.cfg.checkpoint.keep, t.ckpt_root
        timeout = float(t.cfg.run.collective_timeout_s or 1800)
        zipfile = self._snapshots.zipfile

        def job() -> None:
            async_save.write_files(files, zipfile=zipfile, step=step)
            ckstate.save(tag_dir, ckstate.rank_stem(rank), fields, tensors)  # this rank's last file: the JSON
            if is_main:
                async_save.wait_for_ranks(tag_dir, world, timeout_s=timeout)
                ckio.mark_complete(tag_dir, meta)
                ckio.prune(root, keep)

        self._writer.submit(job)

    def wait(self) -> None:
        """Every rank: the previous background write is finished; then all ranks meet."""
        if self._writer is not None:
            try:
                self._writer.wait()
            except ckio.DiskFullError as exc:  # the writer thread knew the file, not what the checkpoint needs
                needed, basis = self.bytes_needed()
                raise ckio.disk_full(Path(exc.filename or self.t.ckpt_root), needed, basis=basis) from None
            ddist.barrier()

    def writing(self) -> bool:
        """A background write is still running on this rank."""
        return self._writer is not None and self._writer.busy()

    def finish(self) -> None:
        """End of training: wait for the last write, stop the writer thread, give DeepSpeed its engine back."""
        if self._writer is not None:
            self.wait()
            self._writer.close()
            self._writer = None
            self.t.engine.checkpoint_engine = self._snapshots.base


def state_bytes(engine, world_size: int, zero_stage: int) -> int:
    """About what DeepSpeed writes for this engine: the model's parameters and buffers, and the
    optimizer's state (with ZeRO its fp32 partition too), the latter once per rank under ZeRO."""
    import torch

    def nbytes(x) -> int:
        return x.numel() * x.element_size() if torch.is_tensor(x) else 0

    module = engine.module
    model = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters())
    model += sum(nbytes(b) for b in module.buffers())
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optim = 0
    for group in getattr(base, "param_groups", []):
        for p in group["params"]:
            optim += (nbytes(p) if zero_stage > 0 else 0) + sum(nbytes(v) for v in base.state.get(p, {}).values())
    return model + optim * (world_size if zero_stage > 0 else 1)
