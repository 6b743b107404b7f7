"""`distvit train --print-config`: the config resolved for the launch it runs under (world size from the
launcher's environment, device from run.device), with a header naming both; a GPU launch previewed on a
machine without one; what that launch could not run refused in one line before any process group exists."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distvit.cli import main

ROOT = Path(__file__).resolve().parent.parent


def print_config(capsys, monkeypatch, *args: str, world: int | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `distvit train ... --print-config`, in this process, for `world` ranks
    (as torchrun's environment says it) or one process alone."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    if world is not None:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    rc = main(["train", *args, "--print-config"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_header_names_device_and_world_size(capsys, monkeypatch):
    rc, out, _ = print_config(capsys, monkeypatch, "--config", "demo_digits", "--set", "run.device=cpu")
    assert rc == 0
    head = out.splitlines()[0]
    assert head == "# resolved for device cpu, world size 1, launcher single; lr 0.002 (optim.lr)"
    assert yaml.safe_load(out)["parallel"]["precision"] == "fp32"  # the header is a comment: the YAML loads
    rc, out, _ = print_config(capsys, monkeypatch, "--config", "demo_digits", "--set", "run.device=cpu",
                              "--set", "parallel.sp_size=2", world=4)
    assert rc == 0 and out.startswith("# resolved for device cpu, world size 4 (dp 2 x sp 2), launcher torch; ")


def test_a_gpu_launch_resolves_without_a_gpu(capsys, monkeypatch):
    rc, out, err = print_config(capsys, monkeypatch, "--config", "demo_digits", "--set", "run.device=cuda",
                                "--set", "parallel.precision=auto")
    assert rc == 0, err
    assert out.startswith("# resolved for device cuda, world size 1, launcher single; ")
    printed = yaml.safe_load(out)
    assert printed["run"]["device"] == "cuda"
    if not torch.cuda.is_available():
        assert "# no CUDA device here: resolved as a GPU launch would be (precision auto taken as bf16" in out
        assert printed["parallel"]["precision"] == "bf16"


def test_refusals_are_one_line_before_start_up(capsys, monkeypatch):
    # DeiT's repeated augmentation x3 needs 3 data-parallel ranks: one process alone cannot run it.
    rc, out, err = print_config(capsys, monkeypatch, "--config", "recipes/deit_small_imagenet", "--set",
                                "run.device=cuda")
    assert rc == 2 and out == ""
    assert err.strip() == ("distvit: error: data.repeated_aug=3 repeats each sample on that many different ranks, "
                           "but there are 1 data-parallel ranks; set data.repeated_aug <= 1 (1: off) "
                           "(--print-config resolved for this launch, one process; preview N ranks with "
                           "RANK=0 WORLD_SIZE=N, a GPU launch with --set run.device=cuda)")
    # the launch the recipe is for resolves
    rc, out, err = print_config(capsys, monkeypatch, "--config", "recipes/deit_small_imagenet", "--set",
                                "run.device=cuda", world=8)
    assert rc == 0 and out.startswith("# resolved for device cuda, world size 8, launcher torch; "), err
    rc, _, err = print_config(capsys, monkeypatch, "--config", "demo_digits", "--set", "run.device=cpu",
                              "--set", "parallel.sp_size=4", world=6)
    assert rc == 2 and err.startswith("distvit: error: parallel.sp_size=4 does not divide the world size 6")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_training_on_a_missing_gpu_is_a_user_error(tmp_path):
    """Not --print-config: a run that asks for CUDA where there is none ends as a user error (exit 2), before start-up."""
    proc = subprocess.run([sys.executable, "-m", "distvit.cli", "train", "--set", "run.device=cuda",
                           "--set", f"run.output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("distvit: error: run.device=cuda but no CUDA device is visible; "
                                   "use run.device=auto or cpu")
