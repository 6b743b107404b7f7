"""Fault injection for the resume and crash tests: DISTVIT_TEST_FAULT=<point>:<step>[:<rank>]
kills this process (a real SIGKILL: no cleanup, no atexit) at a named point of the step loop.
Unset (every real run), each check is one environment lookup."""
from __future__ import annotations

import os
import signal

import torch.distributed as dist


def armed(point: str, step: int) -> bool:
    """Fault injection for the resume tests: DISTVIT_TEST_FAULT=<point>:<step>[:<rank>]."""
    spec = os.environ.get("DISTVIT_TEST_FAULT")
    if not spec:
        return False
    name, at, *rank = spec.split(":")
    return name == point and int(at) == step and (not rank or int(rank[0]) == dist.get_rank())


def maybe_kill(point: str, step: int) -> None:
    """SIGKILL this process at the armed point (a real kill -9: no cleanup, no atexit)."""
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
