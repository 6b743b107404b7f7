"""Distributed set-up in one place: who am I, which device, which backend, which groups.

Rank discovery, in order (the first launcher whose variables are present wins):
  - deepspeed / torchrun / accelerate launch: RANK, WORLD_SIZE, LOCAL_RANK
  - Open MPI mpirun: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK
  - MPICH / Intel MPI (PMI): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
  - Slurm srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (master = first host of the node list)
  - none: a single process (rank 0 of 1)
The innermost launcher wins: mpirun inside a Slurm allocation starts its daemons with srun, so its
ranks also carry SLURM_PROCID / SLURM_NTASKS, but those count nodes (one daemon each), not ranks.
The result is written back to RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT so that
torch.distributed and DeepSpeed see one consistent view whatever launched us.

The mesh: world = dp x sp. Ranks of one sequence-parallel group are consecutive
(rank = dp_rank * sp + sp_rank), so an sp group sits inside a node where links are fastest.
ZeRO and the data loader work over the dp group; attention's collectives over the sp group.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torch | slurm | openmpi | pmi | single


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'node[003-005,007],gpu1' -> 'node003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def discover() -> LaunchInfo:
    """Read rank / world / local rank from whichever launcher started this process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), _int_env("LOCAL_RANK") or 0, "torch")
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo(
            int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
            _int_env("OMPI_COMM_WORLD_LOCAL_RANK") or 0, "openmpi",
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return LaunchInfo(int(env["PMI_RANK"]), int(env["PMI_SIZE"]), _int_env("MPI_LOCALRANKID", "PALS_LOCAL_RANKID") or 0, "pmi")
    # SLURM_STEP_ID tells an srun task from the batch shell, which also has SLURM_PROCID=0.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env.get("SLURM_STEP_ID") is not None:
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), _int_env("SLURM_LOCALID") or 0, "slurm")
    return LaunchInfo(0, 1, 0, "single")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agree_master(info: LaunchInfo) -> None:
    """MASTER_ADDR / MASTER_PORT for launchers that do not set them."""
    env = os.environ
    if info.launcher == "slurm" and "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = first_slurm_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if info.launcher in ("openmpi", "pmi") and "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _mpi_broadcast_master_addr()
    if info.launcher == "single":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    if "MASTER_PORT" not in env:
        # Every rank derives the same port from the job id (or a fixed default), no exchange needed.
        job = env.get("SLURM_JOB_ID") or env.get("OMPI_MCA_ess_base_jobid") or "0"
        env["MASTER_PORT"] = str(29500 + int(re.sub(r"\D", "", job) or 0) % 1000)


def _mpi_broadcast_master_addr() -> str:
    """Rank 0's host name, agreed through mpi4py when it is installed; loopback otherwise.

    Without mpi4py every rank must be on one host (mpirun -np N on one machine), which is
    checked by the local-size variables: multi-host MPI needs `pip install 'distvit[mpi]'`.
    """
    try:
        from mpi4py import MPI
    except ImportError:
        local = _int_env("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
        world = _int_env("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
        if local is not None and world is not None and local != world:
            raise RuntimeError(
                f"mpirun placed {world} ranks on several hosts ({local} on this one) and MASTER_ADDR is not set; "
                "install mpi4py (pip install 'distvit[mpi]') or export MASTER_ADDR=<rank 0 host> before mpirun"
            )
        return "127.0.0.1"
    return MPI.COMM_WORLD.bcast(socket.gethostname() if MPI.COMM_WORLD.Get_rank() == 0 else None, root=0)


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from distvit.errors import UserError  # a setting of the user's, not a fault of ours

            raise UserError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL alone on CUDA (no CPU backend), gloo on CPU.

    We do not add "cpu:gloo" beside NCCL: every group would then also build a gloo communicator
    (a full mesh of TCP connections per group, DeepSpeed's groups included), and a CPU collective
    would still cost the step a device-to-host copy and a sync. Instead every collective distvit
    issues runs on its group's device, a rule kept in one place: distvit/parallel/comm.py.
    """
    return "nccl" if device.type == "cuda" else "gloo"


def init(device_request: str = "auto", timeout_s: float = 1800) -> tuple[LaunchInfo, torch.device]:
    """Discover the launch, export a consistent env, pick the device and start the process group.

    The rendezvous is ours (distvit/watchdog.py): it names the ranks that never arrived after
    `timeout_s`, and it polls, so a signal ends a waiting rank. The process group's collectives
    get the same timeout, and a heartbeat thread ends every rank when one stops responding.
    """
    info = discover()
    env = os.environ
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(info.rank), str(info.world_size), str(info.local_rank)
    _agree_master(info)
    device = pick_device(device_request, info.local_rank)
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import; on a CPU run it must be its CPU accelerator.
        env.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        import deepspeed

        from distvit import watchdog
        from distvit.parallel import op_load

        global _store, _watchdog
        addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        timeout = timedelta(seconds=timeout_s)
        # torchrun's agent already serves the store on MASTER_PORT; otherwise rank 0 hosts it.
        host = info.rank == 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        try:
            _store = dist.TCPStore(addr, port, info.world_size if host else None, is_master=host,
                                   timeout=timeout, wait_for_workers=False)
        except (RuntimeError, OSError) as exc:
            raise watchdog.HangError(
                f"rank {info.rank}: cannot {'open' if host else 'reach'} the rendezvous store at {addr}:{port} "
                f"within run.collective_timeout_s={timeout_s:g} s ({str(exc).splitlines()[0][:160]}); check that rank 0 "
                "is running and MASTER_ADDR/MASTER_PORT point at it (a port in use: pick another --master-port)"
            ) from exc
        watchdog.rendezvous(_store, info.rank, info.world_size, timeout_s, f"{addr}:{port}")
        dist.init_process_group(backend_for(device), store=dist.PrefixStore("distvit_pg", _store),
                                rank=info.rank, world_size=info.world_size, timeout=timeout)
        _watchdog = watchdog.start(addr, port, info.rank, info.world_size, timeout_s)
        # DeepSpeed wraps the group that exists (it does not create another); its shm op is loaded
        # first, clearing a build lock that a killed process left (op_load.py: else a silent hang).
        op_load.preload(op_load.SHM_COMM)
        deepspeed.init_distributed(dist_backend=backend_for(device), auto_mpi_discovery=False, timeout=timeout,
                                   rank=info.rank, world_size=info.world_size)
    return info, device


_store = None  # the rendezvous store (rank 0 hosts it unless torchrun's agent does): lives with the job
_watchdog = None


@dataclass
class Mesh:
    """The dp x sp process-group mesh. Build it with `Mesh.build(sp_size)` after `init()`."""

    rank: int
    world_size: int
    sp_size: int
    dp_group: object = field(repr=False)
    sp_group: object = field(repr=False)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @staticmethod
    def check(world_size: int, sp_size: int) -> None:
        if sp_size < 1 or world_size % sp_size:
            raise ValueError(
                f"parallel.sp_size={sp_size} does not divide the world size {world_size} "
                f"(world = dp x sp); choose sp_size from {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
            )

    @classmethod
    def build(cls, sp_size: int = 1) -> "Mesh":
        world, rank = dist.get_world_size(), dist.get_rank()
        cls.check(world, sp_size)
        dp_size = world // sp_size
        dp_group = sp_group = None
        # Every rank must create every group, in the same order.
        for s in range(sp_size):
            ranks = [d * sp_size + s for d in range(dp_size)]
            g = dist.new_group(ranks) if dp_size < world else dist.group.WORLD
            if rank in ranks:
                dp_group = g
        for d in range(dp_size):
            ranks = [d * sp_size + s for s in range(sp_size)]
            g = dist.new_group(ranks) if sp_size < world else dist.group.WORLD
            if rank in ranks:
                sp_group = g
        return cls(rank=rank, world_size=world, sp_size=sp_size, dp_group=dp_group, sp_group=sp_group)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log0(*args) -> None:
    """print on rank 0 only (every rank before the process group exists)."""
    if is_main():
        print(*args, flush=True)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if _watchdog is not None:
        _watchdog.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
