"""`accelerate launch --cpu --num_processes 2` (issue 20): it starts one process; we say so instead of training on 1 rank."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from distvit.config import ConfigError
from distvit.launch_check import check_accelerate_cpu
from trainer_helpers import ROOT, free_port, run_env


def test_accelerate_cpu_with_several_processes_is_refused_and_others_pass():
    single = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(ConfigError, match=r"^accelerate launch --cpu started 1 process .* --multi_gpu --num_processes N"):
        check_accelerate_cpu(single)
    check_accelerate_cpu({"ACCELERATE_USE_CPU": "True"})  # --num_processes 1: fine
    check_accelerate_cpu({**single, "RANK": "0", "WORLD_SIZE": "2"})  # under mpirun/torchrun: real ranks
    check_accelerate_cpu({"MASTER_ADDR": "127.0.0.1"})  # not accelerate


def test_real_accelerate_cpu_launch_fails_with_the_line(digits_dir, tmp_path):
    import subprocess

    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(ROOT / "launch" / "train.py"),
           "--config", "demo_digits", "--set", f"run.output_dir={tmp_path}", "--set", f"data.train={digits_dir}/train-*.tar"]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "distvit: error: accelerate launch --cpu started 1 process although --num_processes asked for more" in proc.stderr
    assert not (tmp_path / "demo_digits" / "checkpoints").exists()
