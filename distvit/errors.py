"""User errors and the one top-level handler every entry point runs under.

    sys.exit(errors.guard("distvit train", train_main, argv))

An error a user can cause reaches the terminal as one line, `distvit train: error: <what>, <where
it came from>; <the fix>`, and the process exits non-zero (2 for a user error, 1 for anything
else). `DISTVIT_DEBUG=1` prints the traceback as well.

What counts as a user error: `UserError` and the package's own named errors (ConfigError,
DataError, CheckpointError, ...; see `_named_user_errors`), a ValueError/TypeError raised by
distvit's own code (every such raise names the bad value and the fix: a model-name typo,
sp_size vs. heads, image vs. patch size), and the operating system refusing a write (disk full,
read-only or missing folder), which is reworded here, including torch's C++ "basic_ios::clear:
iostream error" for a full disk. Anything else is printed as one line too, marked as an internal
error, with the hint to rerun with DISTVIT_DEBUG=1.

Under several ranks each distinct message is printed once: after the process group exists the
first rank to record a message in the rendezvous store prints it; before it exists rank 0 (and the
first rank of every other host) prints. A rank that fails records that in the store, so its peers
(see distvit/watchdog.py) exit instead of waiting for it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import traceback
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parent)
_output_dirs: list[Path] = []  # folders this process writes to, for the disk-full message
_signal: int | None = None  # a stop signal this process received (see note_signal)


class UserError(Exception):
    """A mistake the user can fix; the message is one line: what, where it came from, the fix."""


def note_output_dir(path: str | Path) -> None:
    """Remember a folder the run writes to, so a full disk can be named in the message."""
    _output_dirs.append(Path(path))


def note_signal(signum: int) -> None:
    """A stop signal arrived: an error that follows (a peer gone mid-collective) is its echo, not news."""
    global _signal
    _signal = signum


def debug() -> bool:
    return os.environ.get("DISTVIT_DEBUG", "") not in ("", "0")


def _named_user_errors() -> tuple[type, ...]:
    names = [("distvit.config", "ConfigError"), ("distvit.data.errors", "DataError"),
             ("distvit.checkpoint.cli", "CheckpointError"), ("distvit.checkpoint.reshape", "ReshapeError"),
             ("distvit.models.weights", "WeightsMismatchError"), ("distvit.engine.trainer", "TrainingDiverged"),
             ("distvit.checkpoint.io", "DiskFullError"), ("distvit.checkpoint.io", "CheckpointWriteError")]
    found: list[type] = [UserError]
    for module, name in names:
        mod = sys.modules.get(module)  # only what was imported can have been raised
        if mod is not None and hasattr(mod, name):
            found.append(getattr(mod, name))
    return tuple(found)


def _raised_by_distvit(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PACKAGE_DIR)


def _one_line(text: str) -> str:
    """torch re-raises a data worker's error as 'Caught X in DataLoader worker ...\\nOriginal Traceback ...'."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and any("Traceback" in line for line in lines):
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and head.endswith(("Error", "Exception")) else last
    return " ".join(line.strip() for line in lines)


def _disk_hint() -> str:
    for d in reversed(_output_dirs):
        probe = next((p for p in [d, *d.parents] if p.exists()), None)
        if probe is not None:
            free = shutil.disk_usage(probe).free
            return f" ({probe} has {free / 2**20:.0f} MiB free)"
    return ""


def _os_message(exc: OSError) -> str | None:
    what = f" '{exc.filename}'" if exc.filename else " a file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing{what}{_disk_hint()}; free space there or point "
                "run.output_dir at a larger disk (the last complete checkpoint is intact)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{what}: {exc.strerror}; make it writable or set run.output_dir to a folder you can write"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return f"{exc.strerror}:{what or ' ' + str(exc)}; check the path"
    return None


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for an internal error."""
    if isinstance(exc, _named_user_errors()):
        return _one_line(str(exc))
    if isinstance(exc, OSError):
        msg = _os_message(exc)
        if msg is None and isinstance(exc, FileNotFoundError):
            return _one_line(str(exc))
        return msg
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(s in text for s in ("iostream error", "PytorchStreamWriter failed", "file write failed", "unexpected pos")):
        # torch.save's C++ writer reports a full disk (or a vanished folder) this way.
        return (f"writing a file failed ({_one_line(text)[:80]}){_disk_hint()}; the disk holding the run folder is most "
                "likely full: free space or point run.output_dir at a larger disk (the last complete checkpoint is intact)")
    if isinstance(exc, (ValueError, TypeError)) and _raised_by_distvit(exc):
        return _one_line(text)
    return None


def _peer_lost(exc: BaseException) -> str | None:
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(s in text for s in ("Connection closed by peer", "Connection reset by peer")):
        return ("lost the connection to another rank in a collective: that rank exited or was killed (its own "
                "message, or the launcher's, says why)")
    if isinstance(exc, RuntimeError) and "Timed out" in text and any(s in text for s in ("gloo", "NCCL", "Watchdog")):
        return ("a collective waited longer than run.collective_timeout_s for another rank, which is alive but "
                "elsewhere in the program (a rank-dependent code path?); rerun with DISTVIT_DEBUG=1 for the traceback")
    return None


def rank() -> int:
    return _rank()[0]


def _rank() -> tuple[int, int]:
    """(rank, local rank) from the process group or the launcher's variables, without side effects."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0") or 0)
    except Exception:
        pass
    env = os.environ
    for rank_var, local_var in (("RANK", "LOCAL_RANK"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
                                ("PMI_RANK", "MPI_LOCALRANKID"), ("SLURM_PROCID", "SLURM_LOCALID")):
        if env.get(rank_var, "").isdigit():
            return int(env[rank_var]), int(env.get(local_var, "0") or 0) if env.get(local_var, "0").isdigit() else 0
    return 0, 0


def _first_to_report(message: str) -> bool | None:
    """True if this rank is the first to record `message` in the rendezvous store; None without a store."""
    from distvit import watchdog

    store = watchdog.client()
    if store is None:
        return None
    watchdog.mark_failed()  # peers waiting for this rank inside a collective exit too
    try:
        return store.add(watchdog.key("msg/" + hashlib.sha1(message.encode()).hexdigest()[:16]), 1) == 1
    except Exception:
        return None


def report(prog: str, message: str, every_rank: bool = False) -> None:
    rank, local_rank = _rank()
    first = _first_to_report(message)
    if first is None:  # no store: rank 0, and the first rank of each other host, speak
        first = rank == 0 or local_rank == 0
    first = first or every_rank
    if first:
        where = f" (rank {rank})" if rank else ""
        print(f"{prog}: error{where}: {message}", file=sys.stderr, flush=True)


def guard(prog: str, fn, *args) -> int:
    """Run an entry point; every exception becomes one line on stderr and a non-zero exit code."""
    try:
        return fn(*args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if rank() == 0:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException as exc:  # noqa: BLE001 - the one place that turns errors into messages
        if debug():
            traceback.print_exc()
        message = user_message(exc)
        if message is None:
            from distvit import watchdog

            if _signal is not None:
                return 128 + _signal  # stopped by a signal: what failed after it is its echo
            if watchdog.peer_failed():
                return 1  # a peer failed first and said why; this rank only lost its partner
            lost = _peer_lost(exc)
            if lost is not None:
                report(prog, lost)
                return 1
            first = next(iter(traceback.extract_tb(exc.__traceback__)[-1:]), None)
            where = f" at {Path(first.filename).name}:{first.lineno}" if first else ""
            message = (f"internal error: {type(exc).__name__}: {_one_line(str(exc))[:300]}{where}; "
                       "rerun with DISTVIT_DEBUG=1 for the traceback and report it")
            report(prog, message)
            return 1
        report(prog, message, every_rank=getattr(exc, "every_rank", False))
        return 2
