"""Device parametrization for the tests that cover a CUDA path (`pytest -m gpu`).

Each such test has one body and runs on `cpu` (in CI) and on `cuda` (marked `gpu`, skipped with a
reason where no CUDA device is present). `pytest -m gpu` on the GPU machine selects the CUDA
variants only; `make gpu-check` runs them there.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = "needs a CUDA device: run `pytest -m gpu` (make gpu-check) on a GPU machine"
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)], id="cuda")
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, device: str) -> None:
    """What a spawned rank sets before importing DeepSpeed: the accelerator follows the device under test."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0" if device == "cuda" else str(rank), DS_ACCELERATOR=device,
                      OMP_NUM_THREADS="1")


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, port, *args) on `world` fresh processes (DeepSpeed picks its accelerator once per process)."""
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)
