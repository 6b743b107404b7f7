"""The same short run under each launcher a user has: every one trains the same model to the same weights.

deepspeed (test_demo.py) and torchrun (test_trainer.py) are covered elsewhere; Slurm and mpirun in
test_slurm.py / test_mpi.py.
"""
import pytest
import torch

from trainer_helpers import launch, load_weights, losses, summary


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
