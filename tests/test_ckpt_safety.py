"""Checkpoints never run code, resume falls back, files and commands (issue 14).

- a planted pickle payload (its `__reduce__` creates a marker file) is refused, naming the file, by
  every `distvit ckpt` verb and by `--resume auto`, which takes the previous checkpoint; the marker
  never appears;
- a truncated newest checkpoint is not complete (COMPLETE's manifest of sizes) and `--resume auto`
  finishes the run from the previous one; when no checkpoint loads the run stops with one line;
- another data.batch_size says which command resumes anyway;
- a full disk names the folder and the bytes, and `latest` stays on the last complete checkpoint;
- files get the user's umask; `consolidate --out` onto a folder or a .pt name is refused.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from distvit.checkpoint import io as ckio
from distvit.checkpoint import safe_load
from distvit.checkpoint.cli import main as ckpt_main
from ops.harness import train_args
from trainer_helpers import launch, load_weights, losses, summary

STEPS = 4
EXTRA = ("checkpoint.every_steps=2", "checkpoint.keep=10")


@pytest.fixture(scope="module")
def run(digits_dir, tmp_path_factory):
    """A 2-rank ZeRO-2 run with checkpoints at steps 2 and 4 (tests change copies of it)."""
    root = tmp_path_factory.mktemp("runs")
    launch(train_args(digits_dir, root, "src", STEPS, *EXTRA))
    return root / "src"


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "src"))


def ckpt(capsys, *argv) -> tuple[int, str, str]:
    code = ckpt_main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


class _Payload:
    """Unpickled with weights_only=False, this creates `marker` (a stand-in for any command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(file: Path, marker: Path, *, update_manifest: bool = True) -> None:
    """Replace a checkpoint file with a payload; like an attacker, keep COMPLETE's manifest consistent."""
    torch.save({"optimizer_state_dict": _Payload(marker), "weights": torch.zeros(3)}, file)
    if update_manifest:
        tag = file.parent
        manifest = json.loads((tag / ckio.COMPLETE).read_text())
        manifest["files"][file.name] = [file.stat().st_size, ckio.sha256(file)]
        (tag / ckio.COMPLETE).write_text(json.dumps(manifest))


def test_payload_runs_when_unpickled_unsafely_and_safe_load_refuses_it(tmp_path):
    marker = tmp_path / "marker"
    f = tmp_path / "evil.pt"
    plant(f, marker, update_manifest=False)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=rf"^{f}: refused, it holds more than tensors"):
        safe_load.load(f)
    assert not marker.exists()
    torch.load(f, weights_only=False)  # the test's payload is real: unsafe loading runs it
    assert marker.exists()


def test_every_ckpt_verb_refuses_a_planted_payload(run_copy, tmp_path, capsys):
    marker = tmp_path / "marker"
    tag = run_copy / "checkpoints" / "step_00000004"
    evil = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant(evil, marker)
    assert ckio.is_complete(tag)  # sizes match the (rewritten) manifest: only safe loading stops it
    code, _, err = ckpt(capsys, "inspect", tag)
    assert code == 2 and f"{evil}: refused" in err and len(err.strip().splitlines()) == 1
    code, out, _ = ckpt(capsys, "verify", tag)
    assert code == 1 and f"bad: {evil}: refused" in out
    code, _, err = ckpt(capsys, "consolidate", tag, "--out", tmp_path / "w.safetensors")
    assert code == 2 and f"{evil}: refused" in err and not (tmp_path / "w.safetensors").exists()
    code, _, err = ckpt(capsys, "reshape", tag, "--out", tmp_path / "u" / "checkpoints")
    assert code == 2 and f"{evil}: refused" in err
    code, out, _ = ckpt(capsys, "prune", run_copy / "checkpoints", "--keep", "1")
    assert code == 0  # prune reads no checkpoint file
    # DeepSpeed's own loaders (zero_to_fp32 here) are never handed the folder
    from distvit.checkpoint.consolidate import consolidated_state_dict

    with pytest.raises(safe_load.UnsafeCheckpointError, match=str(evil)):
        consolidated_state_dict(tag)
    assert not marker.exists()


@pytest.mark.multirank
def test_resume_auto_refuses_a_payload_and_takes_the_previous_checkpoint(run, run_copy, digits_dir, tmp_path):
    marker = tmp_path / "marker"
    evil = run_copy / "checkpoints" / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    plant(evil, marker)
    proc = launch(train_args(digits_dir, tmp_path, "src", STEPS, *EXTRA) + ["--resume", "auto"])
    assert not marker.exists()
    assert f"resume: checkpoint {evil.parent} did not load ({evil}: refused" in proc.stdout
    assert f"trying the previous complete one, {run_copy / 'checkpoints' / 'step_00000002'}" in proc.stdout
    assert f"resumed from {run_copy / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout
    # steps 3 and 4 recomputed from step 2 are the original ones, bitwise; the damaged step 4 is replaced
    assert losses(run_copy) == losses(run) and summary(run_copy)["status"] == "finished"
    a, b = load_weights(run / "model.safetensors"), load_weights(run_copy / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    safe_load.precheck(evil.parent)
    assert ckio.read_latest(run_copy / "checkpoints") == "step_00000004"


@pytest.mark.multirank
def test_resume_auto_after_a_truncated_newest_checkpoint_finishes_the_run(run, run_copy, digits_dir, tmp_path):
    bad = run_copy / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    proc = launch(train_args(digits_dir, tmp_path, "src", STEPS, *EXTRA) + ["--resume", "auto"])
    assert "is incomplete or missing; falling back to the newest complete checkpoint" in proc.stdout
    assert f"resumed from {run_copy / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout
    assert summary(run_copy)["status"] == "finished" and losses(run_copy) == losses(run)
    assert ckio.is_complete(bad.parent)


@pytest.mark.slow
@pytest.mark.multirank
def test_elastic_resume_passes_over_a_refused_checkpoint_to_the_previous_one(run_copy, digits_dir, tmp_path):
    """On 1 rank, `--resume auto` reshapes the 2-rank run's newest checkpoint (checkpoint/elastic.py); a
    file there holding code is refused, named, and the previous checkpoint reshaped instead."""
    marker = tmp_path / "marker"
    evil = run_copy / "checkpoints" / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant(evil, marker)
    proc = launch(train_args(digits_dir, tmp_path, "src", STEPS, *EXTRA) + ["--resume", "auto"], launcher="python")
    prev = run_copy / "checkpoints" / "step_00000002"
    assert (f"elastic resume: {evil.parent} could not be reshaped for 1 rank(s) (UnsafeCheckpointError: {evil}: "
            f"refused") in proc.stdout
    assert f"trying the previous complete one, {prev}" in proc.stdout
    assert f"elastic resume: {prev} was saved by 2 rank(s) (sp=1), this run has 1 (sp=1)" in proc.stdout
    assert summary(run_copy)["status"] == "finished" and not marker.exists()


@pytest.mark.multirank
def test_resume_auto_stops_with_one_line_when_no_checkpoint_loads(run_copy, digits_dir, tmp_path):
    marker = tmp_path / "marker"
    for step in (2, 4):
        plant(run_copy / "checkpoints" / f"step_0000000{step}" / "mp_rank_00_model_states.pt", marker)
    proc = launch(train_args(digits_dir, tmp_path, "src", STEPS, *EXTRA) + ["--resume", "auto"], check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]  # torchrun exits 1 when a rank exits 2
    # "distvit: error:" or "distvit: error (rank 1):": whichever rank reports first prints the line
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distvit: error")]
    assert errors and "no checkpoint could be loaded (2 tried; the newest failed with:" in errors[0]
    assert "distvit ckpt verify" in errors[0]
    assert not marker.exists()


@pytest.mark.multirank
def test_resume_with_another_batch_size_says_how(run, digits_dir, tmp_path):
    tag = run / "checkpoints" / "step_00000004"
    proc = launch(train_args(digits_dir, tmp_path, "bs8", STEPS, "data.batch_size=8") + ["--resume", str(tag)],
                  check=False)
    assert proc.returncode != 0  # torchrun exits 1 when a rank exits 2
    assert "batch_size: saved 16, now 8" in proc.stderr
    assert f"distvit ckpt reshape {tag} --out <new run>/checkpoints" in proc.stderr


# ---------------------------------------------------------------- disk full, permissions, --out


def _no_space(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _meta(step: int) -> ckio.CheckpointMeta:
    return ckio.CheckpointMeta(step=step, epoch=0, world_size=1, dp_size=1, sp_size=1, zero_stage=0, model="vit_digits")


def test_disk_full_names_the_folder_and_bytes_and_latest_stays(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    good, new = root / "step_00000002", root / "step_00000004"
    good.mkdir(parents=True)
    ckio.mark_complete(good, _meta(2))
    new.mkdir()
    (new / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    meta = _meta(4)
    monkeypatch.setattr(ckio.os, "fsync", _no_space)
    with pytest.raises(ckio.DiskFullError) as info:
        ckio.mark_complete(new, meta)
    msg = str(info.value)
    needed = len(meta.to_json().encode())
    assert f"disk full writing a checkpoint in {new}: it needs {needed} bytes" in msg
    assert "bytes are free" in msg and "stays `latest`" in msg and "step_00000002" in msg
    assert ckio.read_latest(root) == "step_00000002" and not ckio.is_complete(new)
    assert [p.name for p in new.iterdir() if p.name.endswith(".tmp")] == []  # no temp file left behind


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_users_umask(tmp_path, umask):
    from distvit.checkpoint.consolidate import save_safetensors
    from distvit.checkpoint.state import save_rank

    old = os.umask(umask)
    try:
        ckio.atomic_write_text(tmp_path / "a.json", "{}")
        ckio.atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "b.pt")
        save_safetensors({"x": torch.zeros(1)}, tmp_path / "c.safetensors", {"format": "pt"})
        save_rank(tmp_path, 0, step=1, epoch=0, best={}, data={}, device=torch.device("cpu"), ema=None)
    finally:
        os.umask(old)
    for f in tmp_path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_consolidate_out_must_be_a_safetensors_file(run, tmp_path, capsys):
    code, _, err = ckpt(capsys, "consolidate", run / "checkpoints", "--out", tmp_path)
    assert code == 2 and f"--out {tmp_path} is a folder; give a file name, e.g. --out {tmp_path / 'model.safetensors'}" in err
    code, _, err = ckpt(capsys, "consolidate", run / "checkpoints", "--out", tmp_path / "model.pt")
    assert code == 2 and "consolidate writes safetensors, name it model.safetensors" in err
    assert list(tmp_path.iterdir()) == []
