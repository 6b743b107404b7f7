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
import errno
from pathlib import Path

from distvit import dist as ddist
from distvit.checkpoint import async_save
from distvit.checkpoint import io as ckio
from distvit.checkpoint import resume as ckresume
from distvit.checkpoint import state as ckstate


class CheckpointManager:
    def __init__(self, trainer, *, is_async: bool | None = None):
        self.t = trainer
        self.is_async = bool(getattr(trainer.cfg.checkpoint, "async")) if is_async is None else is_async
        self._writer: async_save.Writer | None = None
        self._snapshots: async_save.SnapshotCheckpointEngine | None = None
        if self.is_async:
            engine = trainer.engine
            self._snapshots = async_save.SnapshotCheckpointEngine(engine.checkpoint_engine)
            engine.checkpoint_engine = self._snapshots
            self._writer = async_save.Writer()

    def _meta(self) -> dict:
        t = self.t
        return {
            "step": t.step, "epoch": t.epoch, "world_size": t.mesh.world_size,
            "dp_size": t.mesh.dp_size, "sp_size": t.mesh.sp_size,
            "zero_stage": t.cfg.parallel.zero_stage, "model": t.cfg.model.name,
            "precision": t.precision, "config": t.cfg.model_dump(mode="json"),
        }

    def save(self) -> Path:
        t = self.t
        if self.is_async:
            self.wait()  # the previous write is durable (and, on rank 0, marked) on every rank
        tag_dir = t.ckpt_root / ckio.tag_for_step(t.step)
        if (tag_dir in t._saved_tags or tag_dir == t.resume_from) and ckio.is_complete(tag_dir):
            return tag_dir
        from distvit.engine.trainer import _test_fault, log0

        ckresume.clear_stale(t, tag_dir, log0)
        try:
            t.engine.save_checkpoint(str(t.ckpt_root), tag=tag_dir.name, save_latest=False,
                                     client_state={"distvit_step": t.step, "distvit_epoch": t.epoch})
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # the previous checkpoint's size is what this one needs
                prev = ckio.complete_checkpoints(t.ckpt_root)
                need = sum(f.stat().st_size for f in prev[-1].rglob("*") if f.is_file()) if prev else None
                raise ckio.disk_full(tag_dir, need) from None
            raise
        fields, tensors = ckstate.rank_state(step=t.step, epoch=t.epoch, best=t.best,
                                             data=t.train_loader.state_dict(), device=t.device, ema=t.ema)
        t._saved_tags.add(tag_dir)
        if self.is_async:
            self._submit(tag_dir, copy.deepcopy(fields), async_save.snapshot(tensors))
            return tag_dir
        ckstate.save(tag_dir, ckstate.rank_stem(t.rank), fields, tensors)
        _test_fault("crash_in_save", t.step)
        ddist.barrier()
        if t.is_main:
            ckio.mark_complete(tag_dir, self._meta())
            ckio.prune(t.ckpt_root, t.cfg.checkpoint.keep)
        ddist.barrier()
        return tag_dir

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
            self._writer.wait()
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
