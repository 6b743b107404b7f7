"""Resume on another world size through the real launcher (torchrun, gloo): elastic `--resume auto`.

One run is killed and restarted on 2, then 3, then 2 ranks, mid-epoch each time, with no manual
step: `--resume auto` finds a checkpoint of another world size, reshapes it (checkpoint/elastic.py)
and says so in one line. The data are 96 synthetic samples that name themselves
(distvit.data.synthetic), batch 4 per rank:

    2 ranks, steps 1-3     24 samples (an epoch is 12 steps of 8)       kill after step 3
    3 ranks, steps 4-5     24 of the 72 left (6 steps of 12)            kill after step 5
    2 ranks, steps 6-11    the 48 left (6 steps of 8): the epoch ends at step 11

A second case goes from sequence parallelism to none: 2 ranks as 1 dp x 2 sp (24 steps of 4 an
epoch; 3 steps), then 2 ranks as 2 dp (84 left: 10 steps of 8; 2 steps); a third into it: 2 ranks as
2 dp (3 steps), then 2 ranks as 1 dp x 2 sp (72 left: 18 steps of 4; 2 steps), then 2 dp again to the
end of the epoch (64 left: 8 steps of 8). The 2 -> 3 -> 2 case runs at every ZeRO stage (0 copies
whole tensors, 1-3 go through DeepSpeed's universal form).

test_ckpt_reshape_cli_carries_the_cursor_into_another_run: the same by hand, `distvit ckpt reshape`
of a 2-rank checkpoint into a new run's folder, which 3 ranks (or 4 as 2 dp x 2 sp) resume with
`--resume auto` to the end of the epoch; `distvit ckpt inspect` reports the carried cursor.

Checks: the loader state every rank saved equals that of a plain in-process loop that takes
the same path (so the trainer consumed exactly those batches); over the three phases every sample of
the epoch is seen exactly once; and every step's loss and the final weights equal plain torch AdamW
on one process (trainer_helpers.reference_run), fed every rank's batch of each phase (the mean of the
per-rank losses, as DeepSpeed averages the gradients), from the same initial weights, through the same
two reshapes.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from distvit.checkpoint import io as ckio
from distvit.config import load_config
from distvit.data import remap
from distvit.data.synthetic import decode_index, write_synthetic
from ops.harness import train_args
from trainer_helpers import launch, load_weights, losses, reference_run, run_env

# (ranks, sp size, last step of the phase); the last phase ends the run (run.max_steps).
ELASTIC = [(2, 1, 3), (3, 1, 5), (2, 1, 11)]
# sp 2 (one dp rank of 2 sp ranks: 24 steps of 4 an epoch; 3 steps) -> sp 1 (2 dp ranks: 84 left, 10 steps of 8)
SP = [(2, 2, 3), (2, 1, 5)]
# sp 1 (2 dp ranks: 12 steps of 8; 3 steps) -> sp 2 (one dp rank of 2 sp ranks: 72 left, 18 steps of 4; 2 steps)
# -> sp 1 (2 dp ranks: 64 left, 8 steps of 8): the epoch ends at step 13
SP_INTO = [(2, 1, 3), (2, 2, 5), (2, 1, 13)]
# identity transform: each batch names its samples
IDENTITY = ["data.mean=[0.0]", "data.std=[1.0]", "data.train_crop_scale=[1.0,1.0]", "data.train_crop_ratio=[1.0,1.0]",
            "data.hflip=0.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic96")
    write_synthetic(out, shard_sizes=[30, 10, 25, 11, 20])
    return out


def args_for(data: Path, root: Path, total: int, *extra: str) -> list[str]:
    # train_args' digits paths replaced by the synthetic shards; no val split (eval is not under test).
    args = train_args(data, root, "elastic", total, "data.batch_size=4", "data.val=null", "checkpoint.every_steps=1",
                      "checkpoint.keep=20", "data.shuffle_buffer=10", *extra)
    return args


def reference(cfg, phases, carry: bool = True) -> tuple[dict, list[float], list[list[dict]], list[int]]:
    """trainer_helpers.reference_run (plain torch AdamW) through the phases: (weights, per-step losses, each
    phase's loader states at its end, every sample index seen). The data of phase k+1 is the rest of phase
    k's epoch re-split (carry=False: the epoch restarted from its first batch, as reshape did before it
    carried the cursor)."""
    (ranks, sp, last), *rest = phases
    reshapes = [(r // s, end - start) for (r, s, end), (*_, start) in zip(rest, phases)]
    phase_states, seen = [], []
    weights, step_losses = reference_run(
        cfg, last, ranks // sp, total_steps=phases[-1][-1], reshapes=reshapes, carry_data=carry,
        on_batch=lambda r, x, y: seen.extend(decode_index(x)),  # mean 0, std 1: the pixels as stored
        on_phase_end=phase_states.append)
    return weights, step_losses, phase_states, seen


def saved_states(tag: Path, ranks: int) -> list[dict]:
    return [json.loads((tag / f"distvit_rank{r:05d}.json").read_text())["data"] for r in range(ranks)]


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("stage,precision,phases", [(3, "fp32", ELASTIC), (2, "bf16", ELASTIC), (1, "fp32", SP),
                                                    (1, "fp32", ELASTIC), (0, "fp32", ELASTIC), (3, "fp32", SP_INTO)],
                         ids=["zero3-fp32-2to3to2", "zero2-bf16-2to3to2", "zero1-fp32-sp2to1",
                              "zero1-fp32-2to3to2", "zero0-fp32-2to3to2", "zero3-fp32-sp1to2to1"])
def test_elastic_resume_mid_epoch(data, tmp_path, stage, precision, phases):
    total = phases[-1][-1]
    extra = [f"parallel.zero_stage={stage}", f"parallel.precision={precision}", *IDENTITY]
    args = args_for(data, tmp_path, total, *extra)
    ckpts = tmp_path / "elastic" / "checkpoints"
    outs = []
    for i, (ranks, sp, last) in enumerate(phases):
        resume = ["--resume", "auto"] if i else []
        env = run_env(DISTVIT_TEST_FAULT=f"kill_at_step:{last}") if last < total else None
        proc = launch(args + resume + ["--set", f"parallel.sp_size={sp}"], nproc=ranks, env=env, check=last == total)
        assert (proc.returncode != 0) == (last < total), proc.stderr[-3000:]
        outs.append(proc.stdout)
        tag = ckpts / ckio.tag_for_step(last)
        if last < total:
            assert ckio.is_complete(tag) and (ckio.read_meta(tag).world_size, ckio.read_meta(tag).sp_size) == (ranks, sp)

    # One line per restart says what happened.
    for (ranks, sp, last), (prev_ranks, prev_sp, prev_last), out in zip(phases[1:], phases, outs[1:]):
        lines = [line for line in out.splitlines() if line.startswith("elastic resume:")]
        assert len(lines) == 1, out[-3000:]
        assert (f"was saved by {prev_ranks} rank(s) (sp={prev_sp}), this run has {ranks} (sp={sp}); reshaped into "
                f"{ckpts / 'reshaped' / ckio.tag_for_step(prev_last)}") in lines[0]
        assert "resuming a checkpoint reshaped from" in lines[0] and "the RNG state carried over" in lines[0]
    if phases == ELASTIC:
        assert "epoch 0 goes on with its 72 unseen samples (6 steps over 3 dp rank(s) x 1 worker(s))" in outs[1]
        assert "epoch 0 goes on with its 48 unseen samples (6 steps over 2 dp rank(s) x 1 worker(s))" in outs[2]
    elif phases == SP:
        assert "epoch 0 goes on with its 84 unseen samples (10 steps over 2 dp rank(s) x 1 worker(s))" in outs[1]
    else:
        assert "epoch 0 goes on with its 72 unseen samples (18 steps over 1 dp rank(s) x 1 worker(s))" in outs[1]
        assert "epoch 0 goes on with its 64 unseen samples (8 steps over 2 dp rank(s) x 1 worker(s))" in outs[2]

    cfg = load_config("demo_digits", args[3::2])
    ref_weights, ref_losses, ref_states, seen = reference(cfg, phases)
    # Each sample at most once; when the phases end the epoch, every sample of it exactly once.
    assert max(Counter(seen).values()) == 1 and len(seen) == sum(
        (last - first) * 4 * ranks // sp for (ranks, sp, last), (*_, first) in zip(phases, [(0, 0, 0)] + phases))
    if phases in (ELASTIC, SP_INTO):
        assert Counter(seen) == Counter(range(96))
    # What the trainer's ranks saved at the end of each killed phase is the reference loop's position.
    for (ranks, sp, last), states in zip(phases[:-1], ref_states[:-1]):
        assert saved_states(ckpts / ckio.tag_for_step(last), ranks)[::sp] == states

    logged = losses(tmp_path / "elastic")
    assert [s for s, _ in logged] == list(range(1, total + 1))
    assert_like_reference(cfg, phases, precision, logged, tmp_path / "elastic" / "model.safetensors",
                          ref_weights, ref_losses)


def assert_like_reference(cfg, phases, precision, logged, final_file: Path, ref_weights, ref_losses) -> None:
    """Every logged step's loss and the final weights equal trainer_helpers.reference_run's (plain torch
    AdamW through the same phases), within what fp32 summation order (or bf16) explains."""
    got_losses = torch.tensor([float(v) for _, v in logged])
    final = load_weights(final_file)
    if precision == "fp32":
        # Measured apart by float summation order only (DeepSpeed's averaged partial gradients, its
        # clip): ~1e-7 on the losses. A wrong batch moves a loss by >1e-3, a lost Adam moment the
        # weights by ~1e-3: these bounds separate by orders of magnitude.
        torch.testing.assert_close(got_losses, torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        # Adam divides each element's step by its own gradient history, so an element whose gradients
        # are ~0 turns rounding-level differences (sp's all-to-all sums in another order) into a step
        # of up to lr: measured 1 element of 136010 at 1.2e-4 (sp case), none under ZeRO-3. Lost
        # moments or a wrong lr move most elements by ~1e-3.
        outside, total = 0, 0
        for k, ref in ref_weights.items():
            diff = (final[k] - ref).abs()
            outside += int((diff > 1e-5 + 1e-4 * ref.abs()).sum())
            total += ref.numel()
            assert diff.max().item() < cfg.optim.lr, k
        assert outside <= total * 1e-4, (outside, total)
    else:
        # bf16 forward/backward (fp32 master weights and Adam state) against an fp32 reference: bf16
        # keeps 8 significant bits, a relative rounding of 2^-9 per operation, so a loss near 2.3
        # moves by ~1e-3 (measured: 1.3e-3 at most over the 11 steps). The bound must still tell the
        # right data from the wrong: the same reference fed each phase's epoch from its first batch
        # (what reshape did before it carried the cursor) is 0.24 away at most (from step 4 on).
        _, wrong_losses, _, _ = reference(cfg, phases, carry=False)
        diff = (got_losses - torch.tensor(ref_losses)).abs().max().item()
        wrong = (got_losses - torch.tensor(wrong_losses)).abs().max().item()
        print(f"bf16 vs fp32 reference: max loss diff {diff:.2e}; vs the restarted-epoch reference {wrong:.2e}")
        assert diff < 5e-3 and wrong > 10 * diff, (diff, wrong, logged, ref_losses)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("stage,precision,phases", [
    (3, "fp32", [(2, 1, 3), (3, 1, 9)]),
    (3, "bf16", [(2, 1, 3), (4, 2, 12)]),
    # ZeRO-1/2 load a reshaped checkpoint through DeepSpeed's universal load, which asks the mpu for
    # its tensor-parallel size (parallel/mpu.py answers 1; it once had no such method: AttributeError)
    (2, "bf16", [(2, 1, 3), (4, 2, 12)]),
], ids=["zero3-fp32-2to3", "zero3-bf16-2to4-dp2xsp2", "zero2-bf16-2to4-dp2xsp2"])
def test_ckpt_reshape_cli_carries_the_cursor_into_another_run(data, tmp_path, capsys, stage, precision, phases):
    """2 ranks stop after step 3 of the 12-step epoch; `distvit ckpt reshape` writes the checkpoint into a
    new run's folder; the new world resumes it there with `--resume auto` and ends the epoch (72 left:
    3 ranks, 6 steps of 12, steps 4-9; or 4 ranks as 2 dp x 2 sp, 9 steps of 8, steps 4-12). Every
    sample of the epoch is seen exactly once."""
    from distvit.checkpoint.cli import main as ckpt_main

    (_, _, _), (ranks, sp, total) = phases
    args = args_for(data, tmp_path, total, f"parallel.zero_stage={stage}", f"parallel.precision={precision}", *IDENTITY)
    first = launch(args + ["--set", "parallel.sp_size=1"], nproc=2, env=run_env(DISTVIT_TEST_FAULT="kill_at_step:3"), check=False)
    assert first.returncode != 0, first.stderr[-3000:]
    src_root, new_root = tmp_path / "elastic" / "checkpoints", tmp_path / "moved" / "checkpoints"
    src_tag, new_tag = src_root / ckio.tag_for_step(3), new_root / ckio.tag_for_step(3)
    assert ckio.is_complete(src_tag) and ckio.read_meta(src_tag).world_size == 2
    capsys.readouterr()

    code = ckpt_main(["reshape", str(src_root), "--out", str(new_root)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"wrote {new_tag} from {src_tag} (2 rank(s))" in out and "the rest of the epoch's data and the RNG" in out
    assert f"--set run.output_dir={tmp_path} --set run.name=moved --resume auto" in out
    assert (new_root / ckio.LATEST).read_text() == new_tag.name
    # The reshaped checkpoint holds every old dp rank's cursor as it was saved...
    common = json.loads((new_tag / "distvit_common.json").read_text())["data"]
    assert common == {"kind": remap.RESHAPED, "ranks": saved_states(src_tag, 2)}
    # ...and `distvit ckpt inspect` reports it (JSON and text).
    code = ckpt_main(["inspect", str(new_root), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info["path"] == str(new_tag) and info["complete"] is True and info["step"] == 3
    assert info["world_size"] == "any (reshaped)" and info["reshaped_from"]["world_size"] == 2
    assert info["data_cursor_rank0"] == {"kind": "reshaped", "epoch": 0, "old_dp_ranks": 2,
                                         "old_step_in_epoch": 3, "old_epoch_steps": 12}
    code = ckpt_main(["inspect", str(new_tag)])
    text = capsys.readouterr().out
    assert code == 0 and "'kind': 'reshaped'" in text and "'old_dp_ranks': 2" in text and "'old_step_in_epoch': 3" in text

    resumed = launch(args + ["--set", "run.name=moved", "--set", f"parallel.sp_size={sp}", "--resume", "auto"], nproc=ranks)
    assert not [line for line in resumed.stdout.splitlines() if line.startswith("elastic resume:")], resumed.stdout[-3000:]
    assert f"resuming a checkpoint reshaped from 2 to {ranks} rank(s)" in resumed.stdout, resumed.stdout[-3000:]
    assert (f"epoch 0 goes on with its 72 unseen samples ({72 // (4 * ranks // sp)} steps over {ranks // sp} dp rank(s) "
            "x 1 worker(s))") in resumed.stdout
    assert not (src_root / "reshaped").exists()  # the source is left as it was
    end_tag = tmp_path / "moved" / "checkpoints" / ckio.tag_for_step(total)
    assert (ckio.read_meta(end_tag).world_size, ckio.read_meta(end_tag).sp_size) == (ranks, sp)

    cfg = load_config("demo_digits", args[3::2])
    ref_weights, ref_losses, ref_states, seen = reference(cfg, phases)
    assert Counter(seen) == Counter(range(96))  # every sample of the epoch, exactly once
    # The new ranks' loaders end where the reference loop's do: the whole remainder of the epoch taken.
    assert saved_states(src_tag, 2) == ref_states[0] and saved_states(end_tag, ranks)[::sp] == ref_states[1]
    logged = losses(tmp_path / "elastic") + losses(tmp_path / "moved")
    assert [s for s, _ in logged] == list(range(1, total + 1))
    assert_like_reference(cfg, phases, precision, logged, tmp_path / "moved" / "model.safetensors", ref_weights, ref_losses)


def _save_ranks(tag: Path, seeds: list[int]) -> None:
    """Per-rank state files as the trainer writes them, each rank's RNG seeded from `seeds`."""
    from distvit.checkpoint import state as ckstate
    from distvit.engine.build import seed_all

    for rank, seed in enumerate(seeds):
        seed_all(seed)
        torch.rand(3)  # a draw, as a step's drop-path would
        data = {"version": 1, "dp_rank": rank, "dp_size": len(seeds), "epoch": 0}
        ckstate.save_rank(tag, rank, step=3, epoch=0, best={}, data=data, device=torch.device("cpu"), ema=None)


@pytest.mark.parametrize("seeds,carried", [([7, 7], True), ([7, 8], False)])
def test_the_rng_ranks_share_is_carried_and_a_differing_one_is_not(tmp_path, seeds, carried):
    from distvit.checkpoint import state as ckstate
    from distvit.checkpoint.reshape import _common_state

    _save_ranks(tmp_path, seeds)
    common = _common_state(tmp_path, len(seeds))
    assert (common["rng"] is not None) is carried
    assert [s["dp_rank"] for s in common["data"]["ranks"]] == [0, 1] and common["data"]["kind"] == remap.RESHAPED
    ckstate.save_common(tmp_path, **common)
    back = ckstate.load_common(tmp_path)
    assert back["data"] == common["data"]
    if carried:  # the saved state, restored, draws what rank 0 would have drawn next
        torch.manual_seed(0)
        ckstate.set_rng_state(*back["rng"], torch.device("cpu"))
        got = torch.rand(4)
        torch.manual_seed(7), torch.rand(3)
        assert torch.equal(got, torch.rand(4))
    else:
        assert back["rng"] is None
