"""Bad data: one exception type for the user, and the per-worker log that applies `on_error`.

`on_error: raise` stops at the first bad sample with a message naming the shard, the key and the
reason. `on_error: skip` logs a warning (the first `max_logged_errors` per worker and epoch; after
that only a count) and counts the sample, so the trainer can report `bad_samples` in its metrics.
"""
from __future__ import annotations

import logging

log = logging.getLogger("distvit.data")


class DataError(RuntimeError):
    """Unusable data or data settings; the message names what, where, and the fix."""


class BadSample(Exception):
    """One sample that cannot be used (raised by decoding, caught by the stream)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadSampleLog:
    """Counts bad samples of one worker and applies the `on_error` policy to each."""

    def __init__(self, on_error: str, max_logged: int, where: str):
        self.on_error = on_error
        self.max_logged = max_logged
        self.where = where  # e.g. "rank 0 worker 1", for the warnings
        self.count = 0
        self.logged = 0
        self.muted = False  # while replaying a block on resume: those were counted before the checkpoint

    def report(self, shard: str, key: str | None, reason: str, n: int = 1) -> None:
        what = f"shard '{shard}'" + (f", key '{key}'" if key else "")
        if self.on_error == "raise":
            raise DataError(
                f"bad data in {what}: {reason}; fix or remove it, or set data.on_error=skip to skip bad samples"
            )
        if self.muted:
            return
        self.count += n
        if self.logged < self.max_logged:
            self.logged += 1
            plural = f"{n} samples" if n != 1 else "sample"
            log.warning("skipped bad %s in %s (%s): %s", plural, what, self.where, reason)
            if self.logged == self.max_logged:
                log.warning("%s: further bad samples this epoch are counted, not logged", self.where)
