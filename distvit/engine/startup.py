"""Checks that run before the slow part of start-up (process groups, DeepSpeed), on every rank."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from distvit import errors


def check_output_dir(run_dir: Path, output_dir: str, name: str) -> None:
    """The run folder can be created and written (every rank writes its checkpoint shard there).

    Raises UserError naming the folder, the config keys it came from, and the fix: seconds into
    the run instead of after a minute of start-up (or, today, at the first checkpoint).
    """
    run_dir = Path(run_dir)
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise errors.UserError(
            f"run folder '{run_dir}' (run.output_dir={output_dir}, run.name={name}) is not writable: {reason}"
            f"{f' at {exc.filename}' if exc.filename and str(exc.filename) != str(run_dir) else ''}; "
            "set run.output_dir to a folder you can write (with free space), e.g. --set run.output_dir=runs"
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    errors.note_output_dir(run_dir)
