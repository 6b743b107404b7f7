"""No silent hangs (issue 14): a stopped rank, a missing peer and a signal at start-up each end the
run with one named line within run.collective_timeout_s (or seconds, for a signal)."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from trainer_helpers import ROOT, free_port, run_env

SCRIPT = str(ROOT / "launch" / "train.py")


def _args(digits_dir, run_root, name, *extra):
    sets = [f"run.output_dir={run_root}", f"run.name={name}", "log.progress=false", "log.tensorboard=false",
            "log.every_steps=1", f"data.train={digits_dir}/train-*.tar", f"data.val={digits_dir}/val-*.tar", *extra]
    return ["--config", "demo_digits"] + [a for s in sets for a in ("--set", s)]


def _ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    found = {}
    for p in launcher.children(recursive=True):
        try:
            if SCRIPT in " ".join(p.cmdline()) and "RANK" in p.environ():
                found[int(p.environ()["RANK"])] = p
        except psutil.Error:
            pass
    return found


def _wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.multirank
def test_sigstopped_rank_is_named_on_its_peer_within_the_timeout(digits_dir, tmp_path):
    timeout_s = 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}", SCRIPT,
           *_args(digits_dir, tmp_path, "stop", "run.max_steps=100000", "run.epochs=null",
                  f"run.collective_timeout_s={timeout_s}")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = {}
    try:
        _wait_for(lambda: (tmp_path / "stop" / "metrics.csv").is_file(), 240, "the first logged step")
        ranks = _wait_for(lambda: (lambda r: r if len(r) == 2 else None)(_ranks(psutil.Process(proc.pid))), 30, "2 ranks")
        ranks[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        _wait_for(lambda: not ranks[0].is_running() or ranks[0].status() == psutil.STATUS_ZOMBIE, timeout_s + 30,
                  "rank 0 to give up on the stopped rank")
        waited = time.monotonic() - stopped_at
        ranks[1].kill()  # else torchrun gives the stopped rank 30 s to exit after SIGTERM
        _, err = proc.communicate(timeout=120)
    finally:
        for p in ranks.values():
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.kill()
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("distvit: error")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("distvit: error (rank 0): training step ")
    assert "rank(s) [1] stopped responding" in lines[0] and "run.collective_timeout_s=8 s" in lines[0]
    # The last heartbeat seen may predate the stop by one interval (timeout / 10); noisy on 2 shared cores.
    assert timeout_s - 1.5 <= waited <= timeout_s + 20, waited


def _lone_rank(tmp_path, digits_dir, timeout_s):
    """Rank 0 of a 2-rank job whose rank 1 never starts: it waits at the rendezvous."""
    env = run_env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    cmd = [sys.executable, SCRIPT, *_args(digits_dir, tmp_path, "lone", f"run.collective_timeout_s={timeout_s}")]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.multirank
def test_rendezvous_names_the_rank_that_never_arrived(digits_dir, tmp_path):
    proc = _lone_rank(tmp_path, digits_dir, 3)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert "start-up rendezvous at 127.0.0.1:" in lines[0]
    assert "waited 3 s (run.collective_timeout_s) for rank(s) [1] of 2, which never arrived" in lines[0]


@pytest.mark.multirank
@pytest.mark.parametrize("sig,rc,said", [
    (signal.SIGTERM, 128 + signal.SIGTERM, "distvit: stopped by signal 15 during start-up (nothing to save yet)"),
    (signal.SIGINT, 130, "distvit: interrupted"),
], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_waiting_for_a_peer_at_start_up_ends_the_rank(digits_dir, tmp_path, sig, rc, said):
    proc = _lone_rank(tmp_path, digits_dir, 600)
    try:
        # The run folder is created (checked writable) just before the rendezvous starts.
        _wait_for(lambda: (tmp_path / "lone").is_dir(), 180, "the run folder")
        time.sleep(2)
        proc.send_signal(sig)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == rc, err[-3000:]
    assert said in err
    if sig == signal.SIGINT:  # and nothing else: no KeyboardInterrupt traceback
        assert [line for line in err.splitlines() if line.strip()] == [said], err[-3000:]
    assert took < 10, took


def _after_first_logged_step(proc, metrics, timeout=240):
    _wait_for(lambda: proc.poll() is not None or (metrics.is_file() and len(metrics.read_text().splitlines()) > 1),
              timeout, "the first logged step")
    assert proc.poll() is None, proc.communicate()[1][-3000:]


def test_sigint_in_one_process_prints_interrupted_once_and_exits_130(digits_dir, tmp_path):
    cmd = [sys.executable, "-m", "distvit.cli", "train", *_args(digits_dir, tmp_path, "int1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _after_first_logged_step(proc, tmp_path / "int1" / "metrics.csv")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.strip()] == ["distvit: interrupted"], err[-3000:]



@pytest.mark.slow
@pytest.mark.multirank
def test_ctrl_c_under_distvit_torchrun_prints_interrupted_once(digits_dir, tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: the launcher and every rank."""
    cmd = [sys.executable, "-m", "distvit.cli", "torchrun", "--nproc-per-node=2", f"--master-port={free_port()}", SCRIPT,
           *_args(digits_dir, tmp_path, "int2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    ranks = {}
    try:
        _after_first_logged_step(proc, tmp_path / "int2" / "metrics.csv")
        ranks = _ranks(psutil.Process(proc.pid))
        assert len(ranks) == 2
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=90)
        time.sleep(1)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("distvit")]
    assert ours == ["distvit: interrupted", "distvit torchrun: stopped by SIGINT, which every rank was sent (a rank "
                                            "stops at once, without saving)"], err[-3000:]
