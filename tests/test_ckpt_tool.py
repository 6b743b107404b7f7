"""`distvit ckpt` on checkpoints written by real 2-rank runs (torchrun, gloo, ZeRO-2):

- inspect and verify describe a complete checkpoint; a truncated shard or a missing rank file is
  an error naming that file (verify, consolidate and reshape refuse it);
- consolidate equals the trainer's own export; prune keeps the newest K and never `latest`;
- a partial newest checkpoint: the tool and `--resume auto` fall back to the newest complete one, saying so;
- reshape: a 2-rank checkpoint resumed on 1 rank, and a 1-rank one on 2 ranks, carry the exact
  weights and Adam state over, and the next step equals a plain torch AdamW step from them;
  ZeRO-0 and ZeRO-3 checkpoints reshape too.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distvit.checkpoint import io as ckio
from distvit.checkpoint.cli import main as ckpt_main
from distvit.config import load_config
from ops.harness import train_args
from trainer_helpers import launch, load_weights, losses, reference_run, summary

STEPS = 6


@pytest.fixture(scope="module")
def run(digits_dir, tmp_path_factory):
    """One 2-rank ZeRO-2 run with checkpoints at steps 2, 4 and 6 (the original: tests copy it to change it)."""
    root = tmp_path_factory.mktemp("runs")
    launch(train_args(digits_dir, root, "src", STEPS, "checkpoint.every_steps=2", "checkpoint.keep=10"))
    return root / "src"


@pytest.fixture
def ckpts(run, tmp_path) -> Path:
    """A private copy of the run's checkpoints folder."""
    return Path(shutil.copytree(run / "checkpoints", tmp_path / "checkpoints"))


def ckpt(capsys, *argv) -> tuple[int, str, str]:
    code = ckpt_main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_describes_the_newest_complete_checkpoint(run, capsys):
    code, out, _ = ckpt(capsys, "inspect", run / "checkpoints", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["path"] == str(run / "checkpoints" / "step_00000006")
    assert (info["step"], info["world_size"], info["dp_size"], info["zero_stage"]) == (6, 2, 2, 2)
    assert info["model"] == "vit_digits" and info["config"]["run"]["max_steps"] == STEPS
    assert info["complete"] is True
    # rank 0's data cursor: 6 optimizer steps into epoch 0
    assert info["data_cursor_rank0"]["step"] == 6 and info["data_cursor_rank0"]["dp_size"] == 2
    on_disk = {p.name: p.stat().st_size for p in (run / "checkpoints" / "step_00000006").iterdir()}
    assert info["files"] == on_disk and info["total_bytes"] == sum(on_disk.values())


def test_console_script_inspect_and_verify(run):
    exe = Path(sys.executable).parent / "distvit"
    proc = subprocess.run([str(exe), "ckpt", "inspect", str(run / "checkpoints" / "step_00000004")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "step: 4" in proc.stdout and "world_size: 2" in proc.stdout and "zero_stage: 2" in proc.stdout
    proc = subprocess.run([str(exe), "ckpt", "verify", str(run / "checkpoints")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("step_00000006: ok"), proc.stdout + proc.stderr


def test_truncated_shard_is_named_by_verify_consolidate_and_reshape(ckpts, tmp_path, capsys):
    bad = ckpts / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    tag = ckpts / "step_00000006"
    code, out, _ = ckpt(capsys, "verify", tag)
    assert code == 1
    assert f"bad: {bad}: unreadable (" in out and "1 problem(s)" in out
    # COMPLETE's manifest holds every file's size: the truncated checkpoint no longer counts as complete
    code, out, _ = ckpt(capsys, "inspect", tag)
    assert code == 0 and "complete: False" in out and f"problem: {bad}: {len(data) // 2} bytes, the save wrote {len(data)}" in out
    assert not ckio.is_complete(tag)
    code, out, err = ckpt(capsys, "verify", ckpts)  # the folder: its newest *complete* checkpoint, saying so
    assert code == 0 and "step_00000004: ok" in out and f"checkpoint '{tag}' named by" in err
    code, _, err = ckpt(capsys, "consolidate", tag, "--out", tmp_path / "w.safetensors")
    assert code == 2 and f"is not a complete checkpoint: {bad}: unreadable" in err
    assert not (tmp_path / "w.safetensors").exists()
    code, _, err = ckpt(capsys, "reshape", tag, "--out", tmp_path / "new" / "checkpoints")
    assert code == 2 and f"{bad}: unreadable" in err
    assert not (tmp_path / "new" / "checkpoints" / "step_00000006").exists()


def test_missing_rank_file_is_named(ckpts, capsys):
    gone = ckpts / "step_00000004" / "distvit_rank00001.json"
    gone.unlink()
    code, out, _ = ckpt(capsys, "verify", ckpts / "step_00000004")
    assert code == 1 and f"bad: {gone}: missing" in out


def test_consolidate_equals_the_trainer_export(run, tmp_path, capsys):
    out_file = tmp_path / "w.safetensors"
    code, out, _ = ckpt(capsys, "consolidate", run / "checkpoints", "--out", out_file)
    assert code == 0 and f"wrote {out_file}" in out
    got, exported = load_weights(out_file), load_weights(run / "model.safetensors")
    assert set(got) == set(exported)
    for k in exported:  # the same fp32 master weights, merged by the same code: bitwise
        assert torch.equal(got[k], exported[k]), k
    from safetensors import safe_open

    with safe_open(str(out_file), "pt") as f:
        assert f.metadata()["model"] == "vit_digits" and f.metadata()["step"] == "6"
    code, _, err = ckpt(capsys, "consolidate", run / "checkpoints", "--out", out_file)
    assert code == 2 and f"{out_file} exists; pass --overwrite" in err


def test_prune_keeps_the_newest_and_latest(ckpts, capsys):
    code, out, _ = ckpt(capsys, "prune", ckpts, "--keep", "1")
    assert code == 0 and "removed 2 checkpoint(s)" in out
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000006"]
    assert (ckpts / "latest").read_text() == "step_00000006"


def test_prune_never_deletes_what_latest_names(ckpts, capsys):
    # `latest` on step 4 (as after a crash during step 6's save, before it was marked complete)
    (ckpts / "latest").write_text("step_00000004")
    (ckpts / "step_00000006" / "COMPLETE").unlink()
    code, _, _ = ckpt(capsys, "prune", ckpts, "--keep", "1")
    assert code == 0
    # step 4 is both the newest complete and latest; the incomplete step 6 is newer, so it stays too
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]


def test_partial_newest_checkpoint_falls_back_in_tool_and_resume(run, digits_dir, tmp_path, capsys):
    run_dir = tmp_path / "src"
    shutil.copytree(run, run_dir)
    partial = run_dir / "checkpoints" / "step_00000006"
    (partial / "COMPLETE").unlink()
    (partial / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    code, out, err = ckpt(capsys, "inspect", run_dir / "checkpoints")
    assert code == 0
    assert f"checkpoint '{partial}' named by {run_dir / 'checkpoints' / 'latest'} is incomplete" in err
    assert f"resuming from '{run_dir / 'checkpoints' / 'step_00000004'}' instead" in err
    assert "step: 4" in out
    code, out, _ = ckpt(capsys, "verify", partial)
    assert code == 1 and f"{partial / 'COMPLETE'}: missing (the save was interrupted)" in out

    resumed = launch(train_args(digits_dir, tmp_path, "src", STEPS, "checkpoint.every_steps=2", "checkpoint.keep=10")
                     + ["--resume", "auto"])
    assert "is incomplete or missing; falling back to the newest complete checkpoint" in resumed.stdout
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in resumed.stdout
    # steps 5 and 6 recomputed from step 4 are the original steps 5 and 6, bitwise
    assert losses(run_dir) == losses(run)
    a, b = load_weights(run / "model.safetensors"), load_weights(run_dir / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ckio.is_complete(partial) and (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"


# ---------------------------------------------------------------- reshape: another world size


def universal_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every zero/<param>/<state>.pt of a universal checkpoint, keyed 'param/state'."""
    return {f"{f.parent.name}/{f.stem}": torch.load(f, weights_only=False)["param"]
            if f.stem != "step" else torch.load(f, weights_only=False)
            for f in sorted((tag_dir / "zero").glob("*/*.pt"))}


def adamw_reference(cfg, weights: dict, universal_dir: Path, step: int, epoch: int, dp_size: int, n_steps: int):
    """Steps step+1 .. step+n_steps of trainer_helpers.reference_run from whole tensors: the weights, Adam's
    moments and step count from the universal checkpoint, the lr schedule advanced `step` times, and the
    rest of `epoch` as the reshaped checkpoint carries it (data/remap.py), every rank's."""

    def load_state(model, opt):
        model.load_state_dict(weights)
        for name, p in model.named_parameters():
            load = lambda key: torch.load(universal_dir / "zero" / name / f"{key}.pt", weights_only=False)  # noqa: E731
            opt.state[p] = {"step": load("step").float().reshape(()), "exp_avg": load("exp_avg")["param"].clone(),
                            "exp_avg_sq": load("exp_avg_sq")["param"].clone()}

    data_state = json.loads((universal_dir / "distvit_common.json").read_text())["data"]
    return reference_run(cfg, n_steps, dp_size, total_steps=cfg.run.max_steps, start_step=step, epoch=epoch,
                         setup=load_state, data_state=data_state)


def to_universal(tag_dir: Path, out_root: Path) -> Path:
    from distvit.checkpoint.reshape import reshape

    return reshape(tag_dir, out_root)


@pytest.mark.slow
@pytest.mark.multirank
def test_reshape_2_to_1_to_2_carries_weights_and_adam_state(run, digits_dir, tmp_path, capsys):
    from distvit.checkpoint.consolidate import consolidated_state_dict

    src_tag = run / "checkpoints" / "step_00000004"  # of a 6-step run: the resumed runs keep its schedule
    src_weights = consolidated_state_dict(src_tag)  # DeepSpeed's zero_to_fp32 of the 2-rank shards

    # 2 ranks -> 1: reshape, resume with no step left to take: the 1-rank run saves what it loaded.
    code, out, _ = ckpt(capsys, "reshape", src_tag, "--out", tmp_path / "u2" / "checkpoints")
    assert code == 0 and "any world size resumes its weights, optimizer state and lr schedule" in out
    u2 = tmp_path / "u2" / "checkpoints" / "step_00000004"
    code, out, _ = ckpt(capsys, "verify", u2)
    assert code == 0, out
    one = launch(train_args(digits_dir, tmp_path, "one", 4) + ["--resume", str(u2)], launcher="python")
    assert "reshaped from 2 to 1 rank(s)" in one.stdout
    one_tag = tmp_path / "one" / "checkpoints" / "step_00000004"
    assert ckio.read_meta(one_tag).world_size == 1
    got = load_weights(tmp_path / "one" / "model.safetensors")  # consolidated from the 1-rank ZeRO-2 save
    assert set(got) == set(src_weights)
    for k in src_weights:
        assert torch.equal(got[k], src_weights[k]), k
    # ...and its Adam state: the 1-rank checkpoint, made universal again, holds the same tensors.
    u1 = to_universal(one_tag, tmp_path / "u1" / "checkpoints")
    a, b = universal_tensors(u2), universal_tensors(u1)
    assert set(a) == set(b) and len(a) == 4 * len(src_weights)  # fp32, exp_avg, exp_avg_sq, step
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # 1 rank -> 2, and the run's last two steps: equal to plain torch AdamW from the carried-over state.
    args = train_args(digits_dir, tmp_path, "two", STEPS)
    two = launch(args + ["--resume", str(u1)])
    assert "reshaped from 1 to 2 rank(s)" in two.stdout
    cfg = load_config("demo_digits", args[3::2])
    epoch = json.loads((src_tag / "distvit_rank00000.json").read_text())["epoch"]
    ref_state, ref_losses = adamw_reference(cfg, src_weights, u1, 4, epoch, dp_size=2, n_steps=STEPS - 4)
    logged = losses(tmp_path / "two")
    assert [step for step, _ in logged] == [5, 6]
    # fp32; the distributed step averages two half-batch gradients and DeepSpeed orders the clip's
    # float operations differently: measured 7e-8 apart at most. Zeroed moments, or the lr of one
    # step earlier, move the weights ~2e-3 away: 1e-5 separates the two by orders of magnitude.
    torch.testing.assert_close(torch.tensor([float(v) for _, v in logged]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    got = load_weights(tmp_path / "two" / "model.safetensors")
    for k, ref in ref_state.items():
        assert not torch.equal(ref, src_weights[k]), k  # the reference did move
        torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert summary(tmp_path / "two")["status"] == "finished"


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("stage", [0, 3])
def test_reshape_zero0_and_zero3_2_to_1_keeps_the_weights(digits_dir, tmp_path, stage):
    """ZeRO-0 checkpoints hold whole tensors (copied); ZeRO-3 ones also shard the weights."""
    from distvit.checkpoint.consolidate import consolidated_state_dict

    launch(train_args(digits_dir, tmp_path, "src", 2, f"parallel.zero_stage={stage}"))
    src_tag = tmp_path / "src" / "checkpoints" / "step_00000002"
    out = to_universal(src_tag, tmp_path / "u" / "checkpoints")
    assert ckio.read_meta(out).universal is (stage > 0)
    one = launch(train_args(digits_dir, tmp_path, "one", 2, f"parallel.zero_stage={stage}") + ["--resume", str(out)],
                 launcher="python")
    assert "reshaped from 2 to 1 rank(s)" in one.stdout
    a, b = consolidated_state_dict(src_tag), load_weights(tmp_path / "one" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_on_another_world_size_without_reshape_says_how(run, digits_dir, tmp_path):
    proc = launch(train_args(digits_dir, tmp_path, "one", STEPS) + ["--resume", str(run / "checkpoints")],
                  launcher="python", check=False)
    assert proc.returncode == 2
    assert "was saved by 2 ranks (sp=1), this run has 1 (sp=1)" in proc.stderr
    assert "distvit ckpt reshape" in proc.stderr and "--set model.checkpoint=FILE" in proc.stderr


def test_reshape_refuses_to_overwrite(run, tmp_path, capsys):
    out_root = tmp_path / "u" / "checkpoints"
    assert ckpt(capsys, "reshape", run / "checkpoints" / "step_00000002", "--out", out_root)[0] == 0
    code, _, err = ckpt(capsys, "reshape", run / "checkpoints" / "step_00000002", "--out", out_root)
    assert code == 2 and f"{out_root / 'step_00000002'} already exists" in err
    code, _, err = ckpt(capsys, "reshape", run / "checkpoints" / "step_00000002", "--out", run / "checkpoints")
    assert code == 2 and "is the source's own checkpoints folder" in err
