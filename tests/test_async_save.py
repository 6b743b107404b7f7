"""`checkpoint.async: true` on real 2-rank runs (torchrun, gloo):

- an async save writes the same checkpoint as a sync one (every tensor of every file bitwise),
  and resuming from it continues exactly as resuming from the sync checkpoint (losses as text,
  final weights bitwise);
- kill -9 during a slow background write (training went on meanwhile) leaves the previous
  checkpoint as `latest`; `--resume auto` takes it and the run ends like an uninterrupted one;
- the snapshot is a copy: changing the live state after it does not change what is written.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distvit.checkpoint import io as ckio
from distvit.checkpoint import safe_load
from distvit.checkpoint import state as ckstate
from distvit.checkpoint.async_save import Writer, AsyncSaveError, snapshot
from ops.harness import train_args
from trainer_helpers import launch, load_weights, losses, run_env

STEPS = 6
ZERO3 = "parallel.zero_stage=3"


def flat(obj, prefix="") -> dict:
    """Every tensor and scalar of a nested state, by path."""
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in flat(v, f"{prefix}{k}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in flat(v, f"{prefix}{i}/").items()}
    return {prefix: obj}


def same_checkpoint(a: Path, b: Path) -> None:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name != ckio.COMPLETE)
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name != ckio.COMPLETE)
    for name in names:
        if name.endswith(".pt"):
            fa, fb = flat(safe_load.load(a / name)), flat(safe_load.load(b / name))
            assert fa.keys() == fb.keys(), name
            for k in fa:
                if torch.is_tensor(fa[k]):
                    assert torch.equal(fa[k], fb[k]) and fa[k].dtype == fb[k].dtype, f"{name}: {k}"
                elif k.split("/")[-2:-1] != ["ds_config"]:
                    assert repr(fa[k]) == repr(fb[k]), f"{name}: {k}"
    for r in range(2):
        sa, sb = ckstate.load_rank(a, r), ckstate.load_rank(b, r)
        assert (sa["step"], sa["data"], sa["rng"][0]) == (sb["step"], sb["data"], sb["rng"][0])
        assert all(torch.equal(sa["rng"][1][k], sb["rng"][1][k]) for k in sa["rng"][1])


@pytest.mark.slow
def test_async_checkpoint_equals_sync_and_resumes_bitwise(digits_dir, tmp_path):
    extra = ("checkpoint.every_steps=2", "checkpoint.keep=10", ZERO3)
    launch(train_args(digits_dir, tmp_path, "sync", STEPS, *extra))
    launch(train_args(digits_dir, tmp_path, "async", STEPS, *extra, "checkpoint.async=true"))
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    assert losses(asyn) == losses(sync)  # saving in the background changes nothing in training
    for step in (2, 4, 6):
        tag = ckio.tag_for_step(step)
        assert ckio.is_complete(asyn / "checkpoints" / tag)
        same_checkpoint(asyn / "checkpoints" / tag, sync / "checkpoints" / tag)
    assert ckio.read_latest(asyn / "checkpoints") == ckio.tag_for_step(STEPS)
    assert torch.equal(torch.cat([v.flatten() for v in load_weights(asyn / "model.safetensors").values()]),
                       torch.cat([v.flatten() for v in load_weights(sync / "model.safetensors").values()]))
    # Resume both from step 2 (in new runs) and train to the end: the same run, bitwise.
    for name in ("sync", "async"):
        launch(train_args(digits_dir, tmp_path, f"re_{name}", STEPS, ZERO3)
               + ["--resume", str(tmp_path / name / "checkpoints" / ckio.tag_for_step(2))])
    assert losses(tmp_path / "re_async") == losses(tmp_path / "re_sync")
    a, b = load_weights(tmp_path / "re_async" / "model.safetensors"), load_weights(tmp_path / "re_sync" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_during_background_write_keeps_the_previous_latest(digits_dir, tmp_path):
    extra = ("checkpoint.every_steps=2", "checkpoint.keep=10", "checkpoint.async=true")
    # Step 4's write is slow (3 s a file) and rank 0 is killed after its first file: meanwhile the
    # training thread went on to steps 5 and 6.
    env = run_env(DISTVIT_TEST_FAULT="kill_in_async_write:4:0", DISTVIT_TEST_SLOW_WRITE_S="3")
    proc = launch(train_args(digits_dir, tmp_path, "run", STEPS, *extra), env=env, check=False)
    assert proc.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert ckio.read_latest(ckpts) == ckio.tag_for_step(2)
    assert ckio.is_complete(ckpts / ckio.tag_for_step(2))
    assert (ckpts / ckio.tag_for_step(4)).is_dir() and not (ckpts / ckio.tag_for_step(4) / ckio.COMPLETE).exists()
    uninterrupted = losses(tmp_path / "run")  # steps 1-6 trained; only the write of step 4 was cut short
    assert [s for s, _ in uninterrupted] == list(range(1, STEPS + 1))  # training went on during the write
    launch(train_args(digits_dir, tmp_path, "run", STEPS, *extra) + ["--resume", "auto"])
    assert losses(tmp_path / "run") == uninterrupted  # resumed from step 2: steps 3-6 again, bitwise
    assert ckio.read_latest(ckpts) == ckio.tag_for_step(6) and ckio.is_complete(ckpts / ckio.tag_for_step(6))


def test_snapshot_is_a_copy_that_keeps_views():
    base = torch.arange(8.0)
    state = {"flat": base, "view": base[2:6], "nested": [{"x": torch.ones(2)}], "n": 3}
    snap = snapshot(state)
    base.add_(100.0)
    state["nested"][0]["x"].zero_()
    assert torch.equal(snap["flat"], torch.arange(8.0)) and torch.equal(snap["nested"][0]["x"], torch.ones(2))
    # a view stays a view of the one copied storage (torch.save writes the same bytes as from the live state)
    assert snap["view"].untyped_storage().data_ptr() == snap["flat"].untyped_storage().data_ptr()
    assert snap["view"].storage_offset() == 2 and torch.equal(snap["view"], torch.arange(2.0, 6.0))


def test_writer_reports_a_failed_job_at_the_next_wait():
    writer = Writer()
    done = []

    def bad():
        raise OSError(28, "No space left on device")

    writer.submit(bad)
    writer.submit(lambda: done.append(1))  # a later job does not run on top of a failed save
    with pytest.raises(AsyncSaveError, match="background checkpoint write failed: OSError"):
        writer.wait()
    assert done == []
    writer.submit(lambda: done.append(2))
    writer.wait()
    writer.close()
    assert done == [2]
