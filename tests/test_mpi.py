"""Launching under Open MPI (4.1 from Debian's openmpi-bin, installed by tests/ops/install_ops_deps.sh):

- `mpirun -np 2 python launch/train.py ...` trains on 2 ranks found from OMPI_COMM_WORLD_*, and ends
  with the losses and weights of the same run under torchrun, bitwise;
- DeepSpeed's own `--launcher openmpi` (with a hostfile) does the same;
- rank discovery: mpirun's variables win over the SLURM_* ones its daemons carry inside an allocation.
Skipped, with the installer's reason, only where Open MPI cannot be installed.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import torch

from distvit.parallel import mesh as ddist
from ops.harness import mpi_env, mpirun_cmd, require_ops_tools, run, train_args
from trainer_helpers import ROOT, launch, load_weights, losses, summary

STEPS = 4
SCRIPT = str(ROOT / "launch" / "train.py")


@pytest.fixture(scope="module")
def torchrun_run(digits_dir, tmp_path_factory):
    """The peer: the same 2-rank run under torchrun."""
    root = tmp_path_factory.mktemp("peer")
    launch(train_args(digits_dir, root, "torchrun", STEPS))
    return root / "torchrun"


def assert_same_run(run_dir: Path, peer: Path) -> None:
    assert summary(run_dir)["status"] == "finished" and summary(run_dir)["steps"] == STEPS
    assert losses(run_dir) == losses(peer)  # as text: bitwise
    a, b = load_weights(peer / "model.safetensors"), load_weights(run_dir / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.multirank
def test_mpirun_two_ranks_equals_torchrun(digits_dir, torchrun_run, tmp_path):
    require_ops_tools()
    env = mpi_env()
    proc = run(mpirun_cmd(2) + [sys.executable, SCRIPT] + train_args(digits_dir, tmp_path, "mpirun", STEPS), env=env)
    assert "on 2 rank(s) [openmpi]" in proc.stdout
    assert_same_run(tmp_path / "mpirun", torchrun_run)


@pytest.mark.slow
@pytest.mark.multirank
def test_deepspeed_openmpi_launcher_equals_torchrun(digits_dir, torchrun_run, tmp_path):
    require_ops_tools()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = mpi_env()
    # --force_multi: take the MPI path for one host; --no_ssh_check: nothing to ssh to. DeepSpeed
    # picks the byte transfer layers itself (`--mca btl ^openib`): we only keep them on loopback.
    mpi_args = ["--allow-run-as-root", "--oversubscribe", "--mca", "oob_tcp_if_include", "lo",
                "--mca", "btl_tcp_if_include", "lo"]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "openmpi",
           "--force_multi", "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", env["MASTER_PORT"],
           "--launcher_args", shlex.join(mpi_args),
           SCRIPT, *train_args(digits_dir, tmp_path, "ds_openmpi", STEPS)]
    proc = run(cmd, env=env)
    assert "on 2 rank(s) [openmpi]" in proc.stdout
    assert_same_run(tmp_path / "ds_openmpi", torchrun_run)


# ---------------------------------------------------------------- rank discovery (no MPI needed)


def _clear_launch_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)


def test_mpirun_inside_an_allocation_takes_the_mpi_ranks(monkeypatch):
    _clear_launch_env(monkeypatch)
    # mpirun across 2 nodes of an allocation starts one daemon per node with srun: its ranks see
    # the daemon step's SLURM_PROCID (the node index) and SLURM_NTASKS (the node count).
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "13")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "16")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "5")
    assert ddist.discover() == ddist.LaunchInfo(13, 16, 5, "openmpi")


def test_pmi_ranks_win_over_slurm_and_torch_env_wins_over_all(monkeypatch):
    _clear_launch_env(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("MPI_LOCALRANKID", "3")
    assert ddist.discover() == ddist.LaunchInfo(3, 4, 3, "pmi")
    # deepspeed / torchrun started inside any of these set RANK and WORLD_SIZE for their children
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddist.discover() == ddist.LaunchInfo(1, 2, 1, "torch")


def test_mpi_across_hosts_without_mpi4py_says_what_to_do(monkeypatch):
    _clear_launch_env(monkeypatch)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails, as without the [mpi] extra
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "16")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8")
    with pytest.raises(RuntimeError, match=r"mpirun placed 16 ranks on several hosts \(8 on this one\) and MASTER_ADDR "
                                           r"is not set; install mpi4py \(pip install 'distvit\[mpi\]'\)"):
        ddist._mpi_broadcast_master_addr()
