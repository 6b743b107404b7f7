"""No silent hangs: a named rendezvous, and heartbeats that turn a stopped peer into an error.

The rendezvous store (a TCPStore at MASTER_ADDR:MASTER_PORT, hosted by rank 0 or by torchrun's
agent) is used for three things besides torch's own process-group set-up:

- `rendezvous()`: every rank records its arrival; a rank still missing after
  `run.collective_timeout_s` is named in the error on every rank that did arrive. The wait polls,
  so SIGTERM/SIGINT end a rank promptly while it waits.
- `Watchdog`: a daemon thread per rank bumps its heartbeat counter every few seconds and reads the
  others'. A rank whose counter has not moved for `collective_timeout_s` (SIGSTOPped, frozen,
  killed without its launcher noticing) makes every other rank print one line naming it and the
  operation they are in, and exit: nobody waits on the process group's own (long) timeout.
- a failure flag: a rank that fails with an error sets it (errors.report); its peers, which
  would otherwise wait for it inside a collective, exit too.

Keys live under `distvit/<restart count>/` so that torchrun's restarts start clean.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

from distvit.errors import UserError

_client = None  # a store client for this module's keys (the main thread's store is torch's)
_phase = "start-up"  # what this rank is doing: a string, or a callable returning one
_self_failed = False


class HangError(UserError):
    """A rendezvous or collective waited longer than run.collective_timeout_s for some ranks."""

    every_rank = True  # each waiting rank says which peers it is missing


def key(name: str) -> str:
    return f"distvit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def set_phase(phase) -> None:
    """Name what this rank is doing (a string or a callable), for the hang message."""
    global _phase
    _phase = phase


def phase() -> str:
    try:
        return _phase() if callable(_phase) else _phase
    except Exception:
        return "training"


def client():
    return _client


def connect(addr: str, port: int, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def mark_failed() -> None:
    """This rank failed: its peers stop waiting for it (called by errors.report)."""
    global _self_failed
    _self_failed = True
    if _client is not None:
        try:
            _client.add(key("failed"), 1)
        except Exception:
            pass


def peer_failed() -> bool:
    if _client is None:
        return False
    try:
        return _client.add(key("failed"), 0) > 0
    except Exception:
        return False


def rendezvous(store, rank: int, world: int, timeout_s: float, where: str) -> None:
    """Wait until every rank arrived; on timeout name the ranks that did not, then raise HangError."""
    store.set(key(f"arrived/{rank}"), "1")
    store.add(key("arrived"), 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key("arrived"), 0) < world:
        if time.monotonic() > deadline:
            missing = [r for r in range(world) if not store.check([key(f"arrived/{r}")])]
            raise HangError(
                f"rank {rank}: start-up rendezvous at {where} waited {timeout_s:.0f} s (run.collective_timeout_s) "
                f"for rank(s) {missing} of {world}, which never arrived; check that the launcher started every rank "
                "(its output above) and that they can reach this address, or raise run.collective_timeout_s"
            )
        time.sleep(0.1)  # a Python loop: a signal handler runs between polls


class Watchdog(threading.Thread):
    """Heartbeats over the store; ends this process if a peer stops responding or fails."""

    def __init__(self, addr: str, port: int, rank: int, world: int, timeout_s: float):
        super().__init__(name="distvit-watchdog", daemon=True)
        self.addr, self.port, self.rank, self.world, self.timeout_s = addr, port, rank, world, timeout_s
        self.interval = max(0.2, min(5.0, timeout_s / 10))
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            store = connect(self.addr, self.port, max(self.interval * 2, 5.0))
        except Exception:
            return  # no watchdog rather than a false alarm; the process group's timeout still applies
        peers = [r for r in range(self.world) if r != self.rank]
        seen = {r: (-1, time.monotonic()) for r in peers}
        last_ok = time.monotonic()
        while not self._stop_event.wait(self.interval):
            now = time.monotonic()
            try:
                store.add(key(f"hb/{self.rank}"), 1)
                for r in peers:
                    count = store.add(key(f"hb/{r}"), 0)
                    if count != seen[r][0]:
                        seen[r] = (count, now)
                failed = store.add(key("failed"), 0)
                last_ok = now
            except Exception:
                if now - last_ok > self.timeout_s and not self._stop_event.is_set():
                    self._fire(f"the rendezvous store at {self.addr}:{self.port} (hosted by rank 0 or the launcher) "
                               f"has not answered for {now - last_ok:.0f} s")
                continue
            if self._stop_event.is_set():
                return
            if failed and not _self_failed:
                time.sleep(self.interval)  # let the failing rank print its message first
                os._exit(1)
            stale = [r for r in peers if now - seen[r][1] > self.timeout_s]
            if stale:
                self._fire(f"rank(s) {stale} stopped responding (no heartbeat for over {self.timeout_s:.0f} s: "
                           "stopped, frozen or killed)")

    def _fire(self, what: str) -> None:
        print(f"distvit: error (rank {self.rank}): {phase()} waited over run.collective_timeout_s="
              f"{self.timeout_s:g} s: {what}; look at those ranks (their log, `kill -CONT` if stopped), "
              "or raise run.collective_timeout_s if they are only slow", file=sys.stderr, flush=True)
        os._exit(3)  # every live rank detects the silent one itself and says so


def start(addr: str, port: int, rank: int, world: int, timeout_s: float) -> Watchdog | None:
    """Connect this module's store client and start the heartbeat thread (nothing for one rank)."""
    global _client
    _client = connect(addr, port, 10.0)
    if world < 2:
        return None
    dog = Watchdog(addr, port, rank, world, timeout_s)
    dog.start()
    return dog
