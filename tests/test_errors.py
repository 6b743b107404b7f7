"""One-line errors everywhere (issue 14): every entry point, single and multi-rank, full disk included."""
import contextlib
import errno
import os
import re
import subprocess
import sys
import time

import pytest

from distvit import errors
from trainer_helpers import ROOT, free_port, run_env

DISTVIT = [sys.executable, "-m", "distvit.cli"]


def _train_args(digits_dir, tmp_path, *extra):
    sets = [f"run.output_dir={tmp_path}/runs", "run.name=e", "run.max_steps=2", "log.progress=false",
            "log.tensorboard=false", f"data.train={digits_dir}/train-*.tar", f"data.val={digits_dir}/val-*.tar", *extra]
    return ["--config", "demo_digits"] + [a for s in sets for a in ("--set", s)]


def _run(cmd, **env):
    return subprocess.run(cmd, cwd=ROOT, env=run_env(PYTHONPATH=ROOT, **env), capture_output=True, text=True, timeout=300)


def _one_error_line(proc, prefix="distvit: error"):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-3000:]
    return lines[0]


def test_unwritable_output_dir_fails_before_start_up_in_one_line(digits_dir, tmp_path):
    (tmp_path / "afile").write_text("")
    start = time.monotonic()
    proc = _run(DISTVIT + ["train", *_train_args(digits_dir, tmp_path, f"run.output_dir={tmp_path}/afile")])
    took = time.monotonic() - start
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert f"run folder '{tmp_path}/afile/e' (run.output_dir={tmp_path}/afile, run.name=e) is not writable" in line
    assert "set run.output_dir to a folder you can write" in line
    assert "deepspeed" not in proc.stdout.lower()  # before process groups and DeepSpeed
    assert took < 120, took  # noisy: imports on a shared machine


def test_wrong_data_path_in_one_process_is_one_line(digits_dir, tmp_path):
    proc = _run(DISTVIT + ["train", *_train_args(digits_dir, tmp_path, f"data.train={tmp_path}/nope-*.tar")])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    line = _one_error_line(proc)
    assert line.startswith(f"distvit: error: shard pattern '{tmp_path}/nope-*.tar' matches no shard; check the path"), line


def test_bad_shard_under_on_error_raise_in_a_data_worker_is_one_line(digits_dir, tmp_path):
    """Every image of one shard corrupt, read by a DataLoader worker: torch re-raises the worker's error
    with its traceback in the message; the user sees the data package's one line."""
    import io
    import shutil
    import tarfile

    data = tmp_path / "data"
    data.mkdir()
    for f in digits_dir.glob("*.tar"):
        shutil.copy(f, data / f.name)
    bad = data / "train-000000.tar"
    with tarfile.open(digits_dir / bad.name) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            payload = src.extractfile(m).read()
            if m.name.endswith(".png"):
                payload = b"not a png" * 8
            m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    proc = _run(DISTVIT + ["train", *_train_args(digits_dir, tmp_path, f"data.train={data}/train-*.tar",
                                                 "data.on_error=raise", "data.num_workers=1")])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors_ = [line for line in proc.stderr.splitlines() if line.startswith("distvit") or "Error" in line]
    assert len(errors_) == 1 and errors_[0].startswith(f"distvit: error: bad data in shard '{bad}', key "), proc.stderr[-3000:]
    assert "data.on_error=skip" in errors_[0]


def test_debug_env_adds_the_traceback(digits_dir, tmp_path):
    (tmp_path / "afile").write_text("")
    proc = _run([sys.executable, str(ROOT / "launch/train.py"),
                 *_train_args(digits_dir, tmp_path, f"run.output_dir={tmp_path}/afile")], DISTVIT_DEBUG=1)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "check_output_dir" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("distvit: error: run folder")


@contextlib.contextmanager
def _tmpfs(path, size, *options):
    """A small tmpfs at path (needs root); skips the test where it cannot be mounted."""
    path.mkdir()
    opts = ",".join([f"size={size}", *options])
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.parametrize("case", ["read-only", "full"])
def test_read_only_or_full_output_disk_fails_before_start_up_in_one_line(digits_dir, tmp_path, case):
    """As root a read-only folder is still writable: a read-only mount, and a tmpfs filled to the last byte."""
    with _tmpfs(tmp_path / "mnt", "256k", *(["ro"] if case == "read-only" else [])) as mnt:
        if case == "full":
            with open(mnt / "filler", "wb") as f, contextlib.suppress(OSError):
                f.write(b"x" * (1 << 20))
        proc = _run(DISTVIT + ["train", *_train_args(digits_dir, tmp_path, f"run.output_dir={mnt}")])
    assert proc.returncode == 2
    line = _one_error_line(proc)
    reason = "Read-only file system" if case == "read-only" else "the disk is full"
    assert line.startswith(f"distvit: error: run folder '{mnt}/e' (run.output_dir={mnt}, run.name=e) is not "
                           f"writable: {reason}"), line
    assert "deepspeed" not in proc.stdout.lower()  # before process groups and DeepSpeed


def test_full_disk_is_one_line_naming_the_disk(digits_dir, tmp_path):
    """A 1 MiB tmpfs as the output disk: DeepSpeed's torch.save of the first checkpoint fills it (torch's
    C++ writer fails with "basic_ios::clear: iostream error", then "unexpected pos"): one line naming the
    checkpoint folder, the bytes it needs (no checkpoint yet: the model and optimizer state) and the free bytes."""
    with _tmpfs(tmp_path / "mnt", "1m") as mnt:
        proc = _run(DISTVIT + ["train", *_train_args(digits_dir, tmp_path, f"run.output_dir={mnt}")])
        partial = sorted(p.name for p in (mnt / "e/checkpoints/step_00000002").iterdir())
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "basic_ios" not in proc.stderr and "Traceback" not in proc.stderr
    assert line.startswith(f"distvit: error: disk full writing a checkpoint in {mnt}/e/checkpoints/step_00000002: "
                           f"it needs "), line
    assert re.search(r"it needs (\d+) bytes \(the model and optimizer state\), (\d+) bytes are free "
                     r"\((\d+) when the save began\)", line), line
    need, free, before = map(int, re.search(r"needs (\d+) bytes .*?, (\d+) bytes are free \((\d+)", line).groups())
    assert 2_000_000 < need < 2_500_000  # vit_digits, ZeRO-2 fp32: the checkpoint takes 2.23 MB
    assert free < 64 << 10 and before < 1 << 20
    assert "point run.output_dir at a larger disk" in line and "(the last complete checkpoint, none yet, stays `latest`)" in line
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in partial  # DeepSpeed's own torch.save hit the full disk


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_at_the_second_checkpoint_keeps_latest_on_the_first(digits_dir, tmp_path, mode):
    """A 3 MiB tmpfs holds one checkpoint (2.23 MB) but not two: the second save fails in torch's writer
    (DeepSpeed's engine, or our background writer under checkpoint.async); the line names the previous
    checkpoint's size as the bytes needed, and `latest` stays on the first, complete checkpoint."""
    with _tmpfs(tmp_path / "mnt", "3m") as mnt:
        proc = _run(DISTVIT + ["train", *_train_args(digits_dir, tmp_path, f"run.output_dir={mnt}", "checkpoint.every_steps=1",
                                                      f"checkpoint.async={mode == 'async'}")])
        from distvit.checkpoint import io as ckio

        root = mnt / "e" / "checkpoints"
        first = root / "step_00000001"
        size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
        latest, complete = ckio.read_latest(root), ckio.is_complete(first)
        second_complete = ckio.is_complete(root / "step_00000002")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert line.startswith(f"distvit: error: disk full writing a checkpoint in {root}/step_00000002: "
                           f"it needs {size} bytes (the size of step_00000001), "), line
    assert re.search(r", \d+ bytes are free", line) and "(the last complete checkpoint, step_00000001, stays `latest`)" in line
    assert latest == "step_00000001" and complete and not second_complete


@pytest.mark.multirank
def test_same_error_on_every_rank_is_printed_once(digits_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(ROOT / "launch/train.py"), *_train_args(digits_dir, tmp_path, f"data.train={tmp_path}/nope-*.tar")]
    proc = _run(cmd)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distvit: error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert f"shard pattern '{tmp_path}/nope-*.tar' matches no shard" in lines[0]
    assert "[rank" not in proc.stderr  # no rank-prefixed Python traceback


def test_model_in_chans_other_than_the_datas_is_one_line_at_load(digits_dir, tmp_path):
    proc = _run(DISTVIT + ["train", *_train_args(digits_dir, tmp_path, "model.in_chans=3")])
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert line.startswith("distvit: error: bad value for config key 'model.in_chans' (from --set model.in_chans=3): 3, "
                           "but the data loader yields data.in_chans=1 (from "), line
    assert "set both to the same value, or leave model.in_chans unset" in line
    assert "deepspeed" not in proc.stdout.lower()  # refused at load, before any process group or engine


def test_sp_size_not_dividing_the_world_size_is_one_line(digits_dir, tmp_path):
    proc = _run(DISTVIT + ["train", *_train_args(digits_dir, tmp_path, "parallel.sp_size=2")])
    assert proc.returncode == 2
    assert _one_error_line(proc) == ("distvit: error: parallel.sp_size=2 does not divide the world size 1 "
                                     "(world = dp x sp); choose sp_size from [1]")


@pytest.mark.slow  # 3 ranks on 2 shared cores: 20-50 s
@pytest.mark.multirank
def test_sp_size_not_dividing_the_heads_is_one_line_naming_both(digits_dir, tmp_path):
    """vit_digits has 4 heads; sp=3 on 3 ranks: Ulysses cannot split them (every rank says so; printed once)."""
    cmd = [*DISTVIT, "torchrun", "--nproc-per-node=3", f"--master-port={free_port()}", str(ROOT / "launch/train.py"),
           *_train_args(digits_dir, tmp_path, "parallel.sp_size=3")]
    proc = _run(cmd)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distvit: error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert ("parallelize_sequence: parallel.sp_size=3 does not divide the model's 4 attention heads, which Ulysses "
            "splits over the sp ranks; use parallel.sp_size in [1, 2, 4] or parallel.sp_impl=ring") in lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["ckpt", "prune", "{tmp}/nope", "--keep", "2"], "distvit ckpt: error: {tmp}/nope: no such folder"),
    (["ckpt", "prune", "{tmp}", "--keep", "0"], "distvit ckpt: error: --keep 0: must be >= 1"),
    (["ckpt", "prune", "{tmp}", "--keep", "-1"], "distvit ckpt: error: --keep -1: must be >= 1"),
    (["data", "verify", "{tmp}/nope-*.tar"], "distvit data: error: "),
    (["train", "--set", "model.name=vit_digit"], "distvit: error: bad value for config key 'model.name' (from --set "
                                                 "model.name=vit_digit): no model named 'vit_digit'; did you mean vit_digits"),
])
def test_every_verb_prints_one_line(tmp_path, argv, expected):
    proc = _run(DISTVIT + [a.format(tmp=tmp_path) for a in argv])
    assert proc.returncode == 2
    _one_error_line(proc, prefix=expected.format(tmp=tmp_path))


def test_distvit_own_value_errors_are_user_errors_third_party_are_not():
    from distvit import models

    with pytest.raises(ValueError) as e:
        models.create("vit_digit")
    assert errors.user_message(e.value).startswith("unknown model 'vit_digit'; did you mean vit_digits")
    try:
        import torch

        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], betas=(1.5, 0.9))
    except ValueError as exc:
        assert errors.user_message(exc) is None


def test_data_worker_error_is_reduced_to_its_message():
    from distvit.data.errors import DataError

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 1, in f\n    raise DataError(...)\n'
                        "distvit.data.errors.DataError: bad data in shard 's.tar': truncated; fix or remove it\n")
    assert errors.user_message(wrapped) == "bad data in shard 's.tar': truncated; fix or remove it"


def test_os_errors_are_reworded(tmp_path):
    errors.note_output_dir(tmp_path)
    full = errors.user_message(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.pt")))
    assert full.startswith(f"no space left on the device writing '{tmp_path}/x.pt' ({tmp_path} has ")
    denied = errors.user_message(PermissionError(errno.EACCES, "Permission denied", "/ro/x"))
    assert denied.startswith("cannot write '/ro/x': Permission denied; make it writable or set run.output_dir")


def test_internal_error_is_one_line_with_the_debug_hint(capsys, monkeypatch):
    monkeypatch.delenv("DISTVIT_DEBUG", raising=False)

    def boom():
        raise KeyError("x")

    assert errors.guard("distvit", boom) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("distvit: error: internal error: KeyError: 'x' at test_errors.py:")
    assert err[0].endswith("rerun with DISTVIT_DEBUG=1 for the traceback and report it")
