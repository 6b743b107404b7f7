"""`distvit torchrun`: torchrun whose failed rank ends the job in one line (issue 14, one-line errors).

Plain torchrun prints its agent's ChildFailedError traceback (~25 lines) after a rank exits with our
one-line error; `distvit torchrun` runs torch.distributed.run in-process with the same options and
signal handling, and replaces that traceback with one line naming the rank and its exit code.
`make demo` uses it; tests/test_launchers.py sends SIGTERM to that line of the Makefile.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from trainer_helpers import ROOT, free_port, rank_processes, run_env, summary

DISTVIT_TORCHRUN = [sys.executable, "-m", "distvit.cli", "torchrun", "--nproc-per-node=2"]


def _args(digits_dir, out, name, *extra):
    sets = [f"run.output_dir={out}", f"run.name={name}", "log.progress=false", "log.tensorboard=false",
            f"data.train={digits_dir}/train-*.tar", f"data.val={digits_dir}/val-*.tar", *extra]
    return [str(ROOT / "launch/train.py"), "--config", "demo_digits"] + [a for s in sets for a in ("--set", s)]


@pytest.mark.multirank
def test_a_failed_rank_is_its_own_line_and_one_launcher_line(digits_dir, tmp_path):
    cmd = DISTVIT_TORCHRUN + [f"--master-port={free_port()}"] + _args(
        digits_dir, tmp_path, "e", "run.max_steps=2", f"data.train={tmp_path}/nope-*.tar")
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]  # the failed rank's own code: a user error
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("distvit: error")]
    assert len(errors) == 1 and f"shard pattern '{tmp_path}/nope-*.tar' matches no shard" in errors[0], proc.stderr
    assert lines[-1].startswith("distvit torchrun: error: rank "), proc.stderr
    assert " exited with code 2 (the error above says why)" in lines[-1]
    assert len(lines) == 2, proc.stderr  # the rank's line, then the launcher's: nothing of the agent's logging


@pytest.mark.slow
@pytest.mark.multirank
def test_sigterm_to_distvit_torchrun_reaches_every_rank_and_says_so_in_one_line(digits_dir, tmp_path):
    name = f"term{os.getpid()}"
    cmd = DISTVIT_TORCHRUN + [f"--master-port={free_port()}"] + _args(digits_dir, tmp_path, name, "log.every_steps=1")
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=run_env(PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        metrics = tmp_path / name / "metrics.csv"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 1):  # a step was logged
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.5)
        assert len(rank_processes(name)) == 2
        launcher.send_signal(signal.SIGTERM)  # the launcher only
        out, err = launcher.communicate(timeout=90)
        time.sleep(1)
        assert rank_processes(name) == []
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("distvit torchrun:")] == [
        "distvit torchrun: stopped by SIGTERM, which every rank was sent (a training rank saves a checkpoint "
        "after its step and exits)"]
    s = summary(tmp_path / name)
    assert s["status"] == "preempted" and s["steps"] >= 1  # each rank saved, then exited
