"""The same short run under each launcher a user has: every one trains the same model to the same weights.

deepspeed (test_demo.py) and torchrun (test_trainer.py) are covered elsewhere; Slurm and mpirun in
test_slurm.py / test_mpi.py.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from trainer_helpers import ROOT, launch, load_weights, losses, rank_processes, run_env, summary


def _args(digits_dir, run_root, name):
    sets = [f"run.output_dir={run_root}", f"run.name={name}", "run.max_steps=4", "log.progress=false",
            "log.tensorboard=false", "log.every_steps=1", f"data.train={digits_dir}/train-*.tar",
            f"data.val={digits_dir}/val-*.tar", "model.drop_path_rate=0.0"]
    return ["--config", "demo_digits"] + [a for s in sets for a in ("--set", s)]


@pytest.mark.multirank
def test_accelerate_launch_equals_torchrun(digits_dir, tmp_path):
    launch(_args(digits_dir, tmp_path, "acc"), launcher="accelerate")
    launch(_args(digits_dir, tmp_path, "tr"), launcher="torchrun")
    assert losses(tmp_path / "acc") == losses(tmp_path / "tr")
    a, b = load_weights(tmp_path / "acc" / "model.safetensors"), load_weights(tmp_path / "tr" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_console_script_equals_launch_script(digits_dir, tmp_path):
    proc = launch(_args(digits_dir, tmp_path, "cli"), launcher="distvit")
    assert "on 1 rank(s) [single]" in proc.stdout
    launch(_args(digits_dir, tmp_path, "py"), launcher="python")
    assert losses(tmp_path / "cli") == losses(tmp_path / "py")
    assert summary(tmp_path / "cli")["steps"] == 4


def _demo_command(venv: Path, run_name: str) -> str:
    """The shell command `make demo` runs (read with `make -n`, so the test follows the Makefile)."""
    out = subprocess.run(["make", "-n", "demo", f"VENV={venv}", f"RUN_NAME={run_name}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    start = out.index("DS_ACCELERATOR=cpu")
    # the launcher line only (continuations joined); the recipe's next line links runs/demo_digits
    return out[start:].replace("\\\n", " ").splitlines()[0].strip()


@pytest.mark.slow
@pytest.mark.multirank
def test_sigterm_to_make_demo_launcher_ends_every_rank(digits_dir, tmp_path):
    """SIGTERM to the launcher `make demo` starts (torchrun) ends both ranks: they save and exit."""
    name = f"sig{os.getpid()}"
    sets = [f"run.output_dir={tmp_path}", f"data.train={digits_dir}/train-*.tar", f"data.val={digits_dir}/val-*.tar",
            "log.progress=false", "log.every_steps=1"]
    cmd = _demo_command(Path(sys.executable).parent.parent, name) + "".join(f" --set {s}" for s in sets)
    launcher = subprocess.Popen(["bash", "-c", f"exec env {cmd}"], cwd=ROOT, env=run_env(PYTHONPATH=ROOT),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        metrics = tmp_path / name / "metrics.csv"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 1):  # a step was logged
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.5)
        assert "torchrun" in " ".join(psutil.Process(launcher.pid).cmdline()) or "torch.distributed.run" in " ".join(
            psutil.Process(launcher.pid).cmdline())
        assert len(rank_processes(name)) == 2
        launcher.send_signal(signal.SIGTERM)  # the launcher only, as `kill <pid>` or a scheduler would
        out, err = launcher.communicate(timeout=60)
        time.sleep(1)
        assert rank_processes(name) == []
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert (tmp_path / name / "summary.json").is_file(), (out[-2000:], err[-4000:])
    s = summary(tmp_path / name)
    assert s["status"] == "preempted" and s["steps"] >= 1  # each rank saved a checkpoint, then exited
