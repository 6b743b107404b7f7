"""Launch mistakes that would otherwise run silently with fewer ranks than asked for.

`accelerate launch --cpu --num_processes N` starts ONE process: with --cpu, accelerate's launcher
runs the script directly (its `simple_launcher`) unless an MPI hostfile is given
(`--mpirun_hostfile`, then it runs under mpirun); --num_processes only sets MASTER_ADDR/PORT.
It cannot be combined with --multi_gpu (accelerate refuses). The process is recognisable by
ACCELERATE_USE_CPU=True together with the MASTER_ADDR accelerate exports for N > 1, and no rank
variables from any launcher; we refuse it, naming the commands that do start N CPU ranks.
"""
from __future__ import annotations

import os

from distvit.config import ConfigError

RANK_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def check_accelerate_cpu(env=None) -> None:
    env = os.environ if env is None else env
    asked_cpu = str(env.get("ACCELERATE_USE_CPU", "")).lower() in ("true", "1", "yes")
    if asked_cpu and env.get("MASTER_ADDR") and not any(v in env for v in RANK_VARS):
        raise ConfigError(
            "accelerate launch --cpu started 1 process although --num_processes asked for more (accelerate runs "
            "several CPU processes only under mpirun, with --mpirun_hostfile); for N CPU ranks use `accelerate launch "
            "--multi_gpu --num_processes N launch/train.py ... --set run.device=cpu` (torchrun underneath, gloo), or "
            "`torchrun --nproc-per-node N`, or `DS_ACCELERATOR=cpu deepspeed --num_accelerators N`"
        )
