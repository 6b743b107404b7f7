"""DeepSpeed's C++ ops loaded under a lock that dies with its holder.

DeepSpeed JIT-builds its host ops (`deepspeed_shm_comm`, which `deepspeed.init_distributed` loads
on the CPU accelerator; `cpu_adam`, for optimizer offload) through torch.utils.cpp_extension, which
guards each build folder with a FileBaton: a `lock` *file* that every loading process creates, even
when the op is built already, and deletes when done. A process killed in between (SIGKILL, a Ctrl-C
or a preemption during start-up) leaves the file behind, and every later run on the machine then
waits on it forever, saying nothing.

So we load each op first, under an flock on a file of our own (the kernel drops an flock with its
holder, however it dies). Holding it, no other distvit process is inside a load, so a baton file
that is there is stale: we remove it, saying so in one line, and load. DeepSpeed caches a loaded op
per process (`OpBuilder._loaded_ops`), so its own load later takes no baton at all. The one case
this cannot tell apart: a process that is *not* distvit building the same op at that moment.
"""
from __future__ import annotations

import fcntl
import sys
from contextlib import contextmanager
from pathlib import Path

SHM_COMM = "ShareMemCommBuilder"  # what deepspeed.init_distributed loads on the CPU accelerator
CPU_ADAM = "CPUAdamBuilder"  # DeepSpeedCPUAdam (optimizer offload)


@contextmanager
def _flock(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_folder(op_name: str) -> Path:
    """Where torch builds (and locks) the JIT extension `op_name`, as torch itself works it out."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op_name, verbose=False))


def preload(builder_name: str) -> None:
    """Load DeepSpeed's op `builder_name` now, clearing a stale build lock first (module docstring).
    A no-op where the accelerator has no such op, or it cannot build here (DeepSpeed then goes
    without it, as it would have)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder.builder import OpBuilder

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    if builder.name in OpBuilder._loaded_ops:
        return
    folder = build_folder(builder.name)
    with _flock(folder.parent / f".distvit-{builder.name}.flock"):
        baton = folder / "lock"
        if baton.exists():
            print(f"distvit: removed a stale build lock {baton} (left by a process killed while it loaded "
                  f"DeepSpeed's {builder.name} op; every later run would have waited on it)", file=sys.stderr, flush=True)
            baton.unlink(missing_ok=True)
        builder.load(verbose=False)
