"""What the Slurm, MPI and checkpoint-tool tests share: the installed tools, the test cluster,
training arguments, and waiting on Slurm jobs. Training processes themselves are launched through
tests/trainer_helpers.py (torchrun, deepspeed, python) or the mpirun helpers here.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_helpers import ROOT, free_port, run_env

OPS = Path(__file__).resolve().parent
SLURM_PARTITION = "distvit"


def train_args(digits_dir: Path, run_root: Path, name: str, steps: int, *extra: str) -> list[str]:
    """launch/train.py arguments for a short digits run that logs every step (as tests/test_trainer.py)."""
    sets = [
        f"run.output_dir={run_root}", f"run.name={name}", f"run.max_steps={steps}", "run.eval_every=1000",
        f"data.train={digits_dir}/train-*.tar", f"data.val={digits_dir}/val-*.tar",
        "data.batch_size=16", "data.num_workers=0", "log.every_steps=1", "log.tensorboard=false",
        "log.progress=false", "schedule.warmup_steps=2", "optim.lr=3e-3", "parallel.precision=fp32",
        # no drop-path: a resumed run does not replay its random draws bitwise (yet), and the
        # plain-torch references here take none
        "model.drop_path_rate=0.0",
    ]
    args = ["--config", "demo_digits"]
    for s in [*sets, *extra]:
        args += ["--set", s]
    return args


# ---------------------------------------------------------------- installed tools


@functools.lru_cache(maxsize=None)
def ops_tools_missing() -> str | None:
    """None when slurm, munge and openmpi are installed (installing them if needed), else why not."""
    proc = subprocess.run(["bash", str(OPS / "install_ops_deps.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return f"tests/ops/install_ops_deps.sh could not install Slurm/Open MPI: {(proc.stderr or proc.stdout).strip()[-300:]}"
    return None


def require_ops_tools() -> None:
    reason = ops_tools_missing()
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------- Slurm


@functools.lru_cache(maxsize=None)
def slurm_conf() -> str:
    """Start (or reuse) the one-host test cluster; returns its SLURM_CONF path."""
    require_ops_tools()
    proc = subprocess.run(["bash", str(OPS / "start_slurm.sh")], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"tests/ops/start_slurm.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
    assert m, proc.stdout
    return m.group(1)


def slurm_env(conf: str | None = None, **extra) -> dict:
    """The environment a test submits jobs with: the test cluster (`conf`, default the one-host one),
    the venv's python, loopback only."""
    base = dict(SLURM_CONF=conf or slurm_conf(), DISTVIT_PYTHON=sys.executable, DISTVIT_ROOT=str(ROOT),
                MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    env = run_env(**(base | extra))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin"
    for name in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[name]  # a test run inside an allocation must not leak it into the jobs
    return env


def slurm(*args: str, env: dict | None = None, check: bool = True, timeout: int = 60) -> str:
    """A Slurm command; with DISTVIT_SUBMIT_NODE in `env`, run on that node of the two-node cluster."""
    env = env or slurm_env()
    if env.get("DISTVIT_SUBMIT_NODE"):
        args = ("bash", str(OPS / "on_node.sh"), env["DISTVIT_SUBMIT_NODE"], *args)
    proc = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def sbatch(args: list[str], *, cwd: Path, env: dict | None = None) -> str:
    """Submit a job that starts in `cwd`; returns the job id."""
    out = slurm("sbatch", "--parsable", f"--chdir={cwd}", *args, env=env)
    return out.strip().split(";")[0]


def job_info(job: str, env: dict | None = None) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = slurm("scontrol", "show", "job", "-o", job, env=env, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job: str, *, timeout: float, until=None, env: dict | None = None, poll: float = 0.5) -> dict[str, str]:
    """Poll until `until(info)` (default: the job has ended), or fail after `timeout` seconds."""
    ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}
    until = until or (lambda info: info.get("JobState") in ended)
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job, env)
        if until(info):
            return info
        time.sleep(poll)
    slurm("scancel", job, env=env, check=False)
    raise AssertionError(f"job {job} still {info.get('JobState')} after {timeout} s: {info}")


# ---------------------------------------------------------------- the two-node cluster (start_cluster2.sh)

NODES = ("dvtest-n1", "dvtest-n2")
NODE_IFACE = "dvnet0"  # each node's end of the veth pair between them
CLUSTER2_UNSUPPORTED = 3  # start_cluster2.sh's exit status where the machine allows no namespaces


def start_cluster2() -> str:
    """Start (or reuse) the two-node cluster; returns its SLURM_CONF. Skips where namespaces are not allowed."""
    require_ops_tools()
    proc = subprocess.run(["bash", str(OPS / "start_cluster2.sh")], capture_output=True, text=True, timeout=120)
    if proc.returncode == CLUSTER2_UNSUPPORTED:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        raise AssertionError(f"tests/ops/start_cluster2.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
    assert m, proc.stdout
    return m.group(1)


def stop_cluster2() -> None:
    subprocess.run(["bash", str(OPS / "stop_cluster2.sh")], capture_output=True, text=True, timeout=120)


def cluster2_env(conf: str, **extra) -> dict:
    """Submitting to the two-node cluster from its first node; ranks talk over the nodes' veth pair."""
    env = slurm_env(conf, DISTVIT_SUBMIT_NODE=NODES[0], GLOO_SOCKET_IFNAME=NODE_IFACE, **extra)
    env.pop("MASTER_ADDR")  # train.sbatch takes the first node of the allocation
    return env


def on_node(node: str, *cmd: str, check: bool = True, timeout: int = 60) -> str:
    proc = subprocess.run(["bash", str(OPS / "on_node.sh"), node, *cmd], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"on {node}: {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def iface_bytes(node: str) -> int:
    """Bytes received so far on the node's end of the veth pair."""
    path = f"/sys/class/net/{NODE_IFACE}/statistics/rx_bytes"  # `ip netns exec` mounts the namespace's /sys
    return int(subprocess.run(["ip", "netns", "exec", node, "cat", path], capture_output=True, text=True,
                              check=True).stdout)


# ---------------------------------------------------------------- Open MPI


def mpirun_cmd(nproc: int, *, env_names: tuple[str, ...] = ()) -> list[str]:
    """mpirun on this host: root allowed, loopback and shared memory only, the env forwarded by name."""
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(nproc), "--allow-run-as-root", "--oversubscribe",
           "--mca", "btl", "self,vader", "--mca", "oob_tcp_if_include", "lo"]
    for name in env_names:
        cmd += ["-x", name]
    return cmd


def mpi_env(**extra) -> dict:
    env = run_env(MASTER_PORT=free_port(), GLOO_SOCKET_IFNAME="lo", **extra)
    env.pop("MASTER_ADDR", None)  # agreed between the ranks by distvit.parallel.mesh, not given
    env.pop("LOCAL_RANK", None)
    return env


def run(cmd: list[str], *, env: dict, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def file_text(path: Path) -> str:
    return Path(path).read_text() if Path(path).is_file() else ""


def is_root() -> bool:
    return os.geteuid() == 0
