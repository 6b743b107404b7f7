"""SIGTERM / SIGUSR1 for the trainer: before the first step they end the process at once (nothing
to save yet; a rank waiting for its peers must not linger); once training runs they ask for a
checkpoint after the current step (`requested`, read at the next read step)."""
from __future__ import annotations

import os
import signal
import sys

from distvit import errors
from distvit.parallel.mesh import log0


class StopSignals:
    def __init__(self) -> None:
        self.requested = False
        self.started = False
        self._install()

    def _install(self) -> None:
        owner = os.getpid()

        def request_stop(signum, frame):
            if os.getpid() != owner:
                # A forked data worker inherited this handler. USR1 (Slurm signals the whole step)
                # is the trainer's to act on; SIGTERM still ends the worker as it would by default.
                if signum == signal.SIGTERM:
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                return
            errors.note_signal(signum)
            if not self.started and signum == signal.SIGTERM:
                # Start-up (e.g. waiting for a peer): no step to finish, nothing to save. Unwinding
                # releases what is held (the op-build lock is freed in a `finally`). USR1, the
                # scheduler's "checkpoint and requeue" warning, is still honoured after the first step.
                if errors.rank() == 0:
                    print(f"distvit: stopped by signal {signum} during start-up (nothing to save yet)", file=sys.stderr, flush=True)
                raise SystemExit(128 + signum)
            self.requested = True
            log0(f"signal {signum}: saving a checkpoint after this step, then exiting for requeue")

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. under some notebook runners)
                pass
