"""slurm/train.sbatch on a real one-host Slurm (slurmctld + slurmd + munge from Debian's packages,
installed and started by tests/ops/): 2 srun tasks train on gloo.

- a USR1 to the batch shell (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@120` sends before
  the time limit) reaches both tasks, they checkpoint at the same step, the job requeues itself, and
  the requeued run finishes with the losses and weights of an uninterrupted job, bitwise;
- slurm/hostfile_from_slurm.sh turns the allocation into a hostfile DeepSpeed's launcher reads;
- srun's variables give rank, world and local rank; the batch shell alone is not a launch.
Skipped, with the installer's reason, only where Slurm cannot be installed (not root, no apt-get).
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

from distvit.parallel import mesh as ddist
from ops.harness import file_text, is_root, sbatch, slurm, slurm_env, train_args, wait_job
from trainer_helpers import ROOT, load_weights, losses, read_metrics, summary

SBATCH = str(ROOT / "slurm" / "train.sbatch")
STEPS = 60  # long enough (~5 s of training) that the signal lands mid-run

@pytest.fixture(scope="module")
def env():
    from ops.harness import require_ops_tools

    if not is_root():
        pytest.skip("the one-host test cluster runs slurmd as root, and this user is not root")
    require_ops_tools()
    return slurm_env()


def job_args(digits_dir: Path, run_root: Path, *extra: str) -> list[str]:
    """The sbatch script's arguments: CONFIG then --set ... (run.name comes from the job id)."""
    args = train_args(digits_dir, run_root, "unused", STEPS, "data.num_workers=2", *extra)
    i = args.index("run.name=unused")
    return [args[1], *args[2:i - 1], *args[i + 1:]]


def wait_for_step(metrics: Path, step: int, job: str, env: dict, timeout: float = 240) -> None:
    """Until the run has logged `step` (so the trainer is past start-up and handles the signal)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(read_metrics(metrics.parent)) >= step:
            return
        time.sleep(0.2)
    slurm("scancel", job, env=env, check=False)
    raise AssertionError(f"job {job} did not log step {step} within {timeout} s")


@pytest.mark.slow
@pytest.mark.multirank
def test_usr1_checkpoints_requeues_and_finishes_like_an_uninterrupted_job(digits_dir, tmp_path, env):
    args = job_args(digits_dir, tmp_path)
    straight = sbatch(["-n", "2", "-o", str(tmp_path / "%x-%j.out"), SBATCH, *args], cwd=tmp_path, env=env)
    preempted = sbatch(["-n", "2", "-o", str(tmp_path / "%x-%j.out"), SBATCH, *args], cwd=tmp_path, env=env)
    info = wait_job(straight, timeout=300, env=env)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), info

    run_dir = tmp_path / f"distvit-{preempted}"
    wait_for_step(run_dir / "metrics.csv", 3, preempted, env)
    slurm("scancel", "--signal=USR1", "--batch", preempted, env=env)
    info = wait_job(preempted, timeout=300, env=env,
                    until=lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and i.get("Restarts") != "0")
    log = file_text(tmp_path / f"distvit-{preempted}.out")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info | {"log": log[-3000:]}

    # One log per job id, both runs in it (--open-mode=append).
    assert f"=== distvit job {preempted} restart 0:" in log and f"=== distvit job {preempted} restart 1:" in log
    assert "got SIGUSR1" in log and "status 'preempted'" in log
    assert f"checkpoint saved; requeueing job {preempted} (it resumes with --resume auto)" in log
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(saved) == 2 and saved[-1] == f"step_{STEPS:08d}", saved
    stop_step = int(saved[0].split("_")[1])
    assert 3 <= stop_step < STEPS
    assert f"resumed from {run_dir / 'checkpoints' / saved[0]} at step {stop_step}" in log
    assert "[slurm]" in log and "on 2 rank(s)" in log

    reference = tmp_path / f"distvit-{straight}"
    assert summary(run_dir)["status"] == "finished" and summary(run_dir)["steps"] == STEPS
    assert losses(run_dir) == losses(reference)  # as text: bitwise
    a, b = load_weights(reference / "model.safetensors"), load_weights(run_dir / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_usr1_with_requeue_off_saves_and_stops(digits_dir, tmp_path, env):
    job = sbatch(["-n", "2", "-o", str(tmp_path / "%x-%j.out"), SBATCH, *job_args(digits_dir, tmp_path)],
                 cwd=tmp_path, env={**env, "DISTVIT_REQUEUE": "0"})
    run_dir = tmp_path / f"distvit-{job}"
    wait_for_step(run_dir / "metrics.csv", 2, job, env)
    slurm("scancel", "--signal=USR1", "--batch", job, env=env)
    info = wait_job(job, timeout=300, env=env)
    log = file_text(tmp_path / f"distvit-{job}.out")
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), info | {"log": log[-3000:]}
    assert f"DISTVIT_REQUEUE=0, so not requeueing. Continue with: sbatch ... --set run.name=distvit-{job}" in log
    assert summary(run_dir)["status"] == "preempted"
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{summary(run_dir)['steps']:08d}"


def test_sbatch_without_config_says_how_to_call_it(tmp_path, env):
    job = sbatch(["-n", "1", "-o", str(tmp_path / "%j.out"), SBATCH], cwd=tmp_path, env=env)
    info = wait_job(job, timeout=60, env=env)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    assert "usage: sbatch [slurm options] slurm/train.sbatch CONFIG [--set section.key=value ...]" in file_text(tmp_path / f"{job}.out")


def test_running_the_script_outside_slurm_says_to_submit_it():
    import subprocess

    proc = subprocess.run(["bash", SBATCH, "demo_digits"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "SLURM_JOB_ID is not set; submit it with sbatch" in proc.stderr


def test_sbatch_with_a_bad_config_fails_before_srun(tmp_path, env):
    job = sbatch(["-n", "1", "-o", str(tmp_path / "%j.out"), SBATCH, "demo_digits", "--set", "optim.lrr=1"], cwd=tmp_path, env=env)
    info = wait_job(job, timeout=60, env=env)
    log = file_text(tmp_path / f"{job}.out")
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert "optim.lrr" in log and "cannot resolve the config 'demo_digits'" in log


def test_hostfile_from_the_allocation_is_read_by_deepspeed(tmp_path, env):
    script = ROOT / "slurm" / "hostfile_from_slurm.sh"
    job = sbatch(["-n", "2", "-o", str(tmp_path / "%j.out"), "--wrap",
                  f"{script} > {tmp_path / 'by_tasks'} && {script} 4 > {tmp_path / 'by_arg'}"], cwd=tmp_path, env=env)
    info = wait_job(job, timeout=60, env=env)
    assert info["JobState"] == "COMPLETED", file_text(tmp_path / f"{job}.out")
    host = socket.gethostname().split(".")[0]
    assert (tmp_path / "by_tasks").read_text() == f"{host} slots=2\n"
    assert (tmp_path / "by_arg").read_text() == f"{host} slots=4\n"
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(tmp_path / "by_tasks"))) == {host: 2}


def test_hostfile_outside_an_allocation_says_so(tmp_path):
    import subprocess

    proc = subprocess.run(["bash", str(ROOT / "slurm" / "hostfile_from_slurm.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "SLURM_JOB_NODELIST is not set; run this inside a Slurm allocation" in proc.stderr


# ---------------------------------------------------------------- launcher discovery (no cluster needed)


def test_srun_task_is_discovered_from_slurm_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert ddist.discover() == ddist.LaunchInfo(5, 8, 1, "slurm")
    # the batch shell has SLURM_PROCID=0 too, but no step: it is not a task of a launch
    monkeypatch.delenv("SLURM_STEP_ID")
    assert ddist.discover() == ddist.LaunchInfo(0, 1, 0, "single")


@pytest.mark.parametrize("nodelist,first", [
    ("vm", "vm"), ("node[003-005,007],gpu1", "node003"), ("gpu[12,3]", "gpu12"), ("a1,b[1-2]", "a1"),
])
def test_master_is_the_first_node_of_the_list(nodelist, first):
    assert ddist.first_slurm_host(nodelist) == first
