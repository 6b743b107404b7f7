"""Async checkpoint save: copy the state to host memory at the save step, write it in the background.

`checkpoint.async: true`. The step pays for one host-memory copy of what the checkpoint holds
(DeepSpeed's model and optimizer states, our per-rank state); the files are written, fsynced and
renamed by one writer thread per rank while training goes on. The protocol of the synchronous
save is kept (docs/design.md, "Checkpoints"): each rank's files are atomic, its
`distvit_rankNNNNN.json` is the last file it writes, and rank 0's writer, once every rank's JSON
is on disk, writes `distvit.json`, `COMPLETE` (the manifest) and then `latest`. Nothing is
`latest` before it is durable; a process killed during the background write leaves a folder
without `COMPLETE`, which `--resume auto` passes over (the previous checkpoint stays `latest`).
The next save, and the end of training, first wait for the previous write to finish.

What we build on, and why not the alternatives:
- DeepSpeed's `CheckpointEngine` interface: `engine.save_checkpoint` writes every file through
  `engine.checkpoint_engine.save(state_dict, path)`, so `SnapshotCheckpointEngine` below only
  changes *when* the bytes reach the disk; the files are the ones the synchronous save writes
  (same `torch.save` serialization, storage sharing kept), and `engine.load_checkpoint`, our
  consolidate and reshape read them unchanged.
- `torch.distributed.checkpoint.async_save` writes DCP's own format (`.distcp` files and a
  `.metadata`), which DeepSpeed's `load_checkpoint` and `zero_to_fp32` do not read: adopting it
  would change the checkpoint format, not just the timing.
- DeepSpeed's `DecoupledCheckpointEngine` spawns a writer process running `FastCheckpointEngine`
  (DeepNVMe's async I/O op, built for CUDA with libaio); it has no CPU path, and the tensors
  would cross a process boundary. A thread is enough here: the writer spends its time in
  `write`, `fsync` and sha256, which release the GIL.

Rank 0 learns that the other ranks are done by seeing their JSON files (the same shared folder
the manifest already hashes), not by a collective: a collective from the writer thread would
interleave with the training thread's own on the same process group.
"""
from __future__ import annotations

import copy
import os
import queue
import signal
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from distvit.checkpoint import io as ckio

# Test hooks (tests/test_async_save.py): DISTVIT_TEST_FAULT=kill_in_async_write:<step>[:<rank>]
# SIGKILLs the process in the writer thread after the first file of that step's checkpoint;
# DISTVIT_TEST_SLOW_WRITE_S=<s> sleeps that long after each file the writer writes.
SLOW_WRITE_ENV = "DISTVIT_TEST_SLOW_WRITE_S"


class AsyncSaveError(RuntimeError):
    pass


def snapshot(obj: Any, memo: dict | None = None) -> Any:
    """A host-memory copy of a (nested) state dict that later training steps cannot change.

    Tensors are copied storage by storage: views of one storage stay views of one copy, so
    `torch.save` writes the same bytes it would have written from the live state. Other leaves
    (numbers, enums, DeepSpeed's loss scaler) are deep-copied.
    """
    memo = {} if memo is None else memo
    if torch.is_tensor(obj):
        return _copy_tensor(obj, memo)
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, snapshot(v, memo)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v, memo) for v in obj)
    return copy.deepcopy(obj)


def _copy_tensor(t: torch.Tensor, memo: dict) -> torch.Tensor:
    t = t.detach()
    storage = t.untyped_storage()
    key = (storage.device, storage.data_ptr(), storage.nbytes())
    copied = memo.get(key)
    if copied is None:
        copied = torch.UntypedStorage(storage.nbytes(), device="cpu")
        copied.copy_(storage)
        memo[key] = copied
    out = torch.empty((0,), dtype=t.dtype, device="cpu")
    out.set_(copied, t.storage_offset(), t.size(), t.stride())
    return out


class Writer:
    """One background thread running queued jobs in order; `wait()` returns when all are done
    and re-raises the first error a job hit (on the training thread, at the next save or the end)."""

    def __init__(self, name: str = "distvit-ckpt-writer"):
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure, later jobs would build on a broken save
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = exc
            finally:
                self._jobs.task_done()

    def busy(self) -> bool:
        return self._jobs.unfinished_tasks > 0

    def wait(self) -> None:
        self._jobs.join()
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, ckio.DiskFullError):
                raise error  # already one line naming the folder, the bytes needed and what stays `latest`
            raise AsyncSaveError(f"background checkpoint write failed: {type(error).__name__}: {error}") from error

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def _fault_armed(step: int) -> bool:
    spec = os.environ.get("DISTVIT_TEST_FAULT", "")
    name, _, rest = spec.partition(":")
    if name != "kill_in_async_write":
        return False
    at, _, rank = rest.partition(":")
    import torch.distributed as dist

    me = dist.get_rank() if dist.is_initialized() else 0
    return int(at) == step and (not rank or int(rank) == me)


def slow_write_pause() -> None:
    pause = float(os.environ.get(SLOW_WRITE_ENV, "0") or 0)
    if pause > 0:
        time.sleep(pause)


def write_files(files: list[tuple[Any, Path]], *, zipfile: bool, step: int) -> None:
    """The writer's part for DeepSpeed's files: each one atomic (temp, fsync, rename)."""
    for i, (state, path) in enumerate(files):
        ckio.atomic_torch_save(state, Path(path), zipfile=zipfile)
        slow_write_pause()
        if i == 0 and _fault_armed(step):
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9 mid-write: no cleanup runs


def _engine_base():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    return CheckpointEngine


class SnapshotCheckpointEngine(_engine_base()):
    """DeepSpeed checkpoint engine that snapshots each file's state and keeps it for the writer.

    `engine.save_checkpoint` calls `save(state_dict, path)` once per file this rank writes; the
    snapshots collect in `pending` until the manager hands them to the writer with `take()`.
    Loading is torch's, as DeepSpeed's default engine does it.
    """

    def __init__(self, base):
        super().__init__(getattr(base, "config_params", None))
        self.name = "distvit.SnapshotCheckpointEngine"
        self.base = base  # DeepSpeed's own engine: loads go through it unchanged
        self.zipfile = getattr(base, "zipfile_serialization", True)
        self.pending: list[tuple[Any, Path]] = []

    def create(self, info) -> None:
        self.pending = []

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str) -> None:
        self.pending.append((snapshot(state_dict), Path(path)))

    def load(self, path: str, map_location=None):
        return self.base.load(path, map_location=map_location)

    def commit(self, info) -> bool:
        return True  # the manager marks the checkpoint complete once every rank's files are durable

    def take(self) -> list[tuple[Any, Path]]:
        files, self.pending = self.pending, []
        return files


def wait_for_ranks(tag_dir: Path, world_size: int, *, timeout_s: float, poll_s: float = 0.05) -> None:
    """Rank 0's writer: block until every rank's last file (its JSON state) is on disk."""
    from distvit.checkpoint import state as ckstate

    names = [tag_dir / f"{ckstate.rank_stem(r)}.json" for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [p for p in names if not p.is_file()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AsyncSaveError(
                f"{tag_dir}: after {timeout_s:.0f} s {len(missing)} rank(s) have not finished writing "
                f"(first missing: {missing[0].name}); the checkpoint is left incomplete and not `latest`"
            )
        time.sleep(poll_s)
