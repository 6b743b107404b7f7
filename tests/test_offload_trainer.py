"""Interleaved offload through the real trainer: 2 CPU ranks under torchrun, ZeRO-3, fp32.

`parallel.offload=interleaved` (fraction 0.5, and auto with its re-planning) must train exactly
like stock `parallel.offload=cpu` from the same seed: on the CPU stand-in the "device" update is
DeepSpeed's own cpu_adam kernel on copies of the same state (distvit/offload/README.md), so the logged
losses (metrics.csv, compared as written) and the exported model.safetensors are bitwise equal.
Any wrong copy, missed sub-group, double step or stale write-back breaks the equality at once.
"""
from __future__ import annotations

import re

import pytest
import torch

from trainer_helpers import launch, load_weights, losses, read_metrics, summary

STEPS = 8
SUB_GROUP_SIZE = 8500  # demo_digits has ~68k elements per rank: 9 sub-groups (what the plan's advice suggests)


def _run(digits_dir, run_root, name, *extra):
    sets = [
        f"run.output_dir={run_root}", f"run.name={name}", f"run.max_steps={STEPS}", "run.eval_every=1000",
        f"data.train={digits_dir}/train-*.tar", f"data.val={digits_dir}/val-*.tar",
        "data.batch_size=16", "data.num_workers=0", "log.every_steps=1", "log.tensorboard=false",
        "log.progress=false", "schedule.warmup_steps=2", "optim.lr=3e-3", "parallel.precision=fp32",
        "parallel.zero_stage=3", f"parallel.sub_group_size={SUB_GROUP_SIZE}", "run.seed=7",
        "model.drop_path_rate=0.0", *extra,
    ]
    args = ["--config", "demo_digits"]
    for s in sets:
        args += ["--set", s]
    proc = launch(args, timeout=240)
    return run_root / name, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def runs(digits_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("offload_runs")
    return {
        "cpu": _run(digits_dir, root, "cpu", "parallel.offload=cpu"),
        "0.5": _run(digits_dir, root, "half", "parallel.offload=interleaved", "parallel.offload_gpu_fraction=0.5"),
        "auto": _run(digits_dir, root, "auto", "parallel.offload=interleaved"),
        "partial": _run(digits_dir, root, "partial", "parallel.offload=partial", "parallel.offload_gpu_fraction=0.25"),
    }


@pytest.mark.multirank
@pytest.mark.slow  # four 2-rank trainer runs (cpu, 0.5, auto, partial): 209 s measured on 2 busy shared cores (noisy)
@pytest.mark.parametrize("fraction", ["0.5", "auto"])
def test_interleaved_trains_bitwise_like_stock_cpu_offload(runs, fraction):
    ref_dir, _ = runs["cpu"]
    got_dir, log = runs[fraction]
    assert summary(got_dir)["status"] == "finished" and summary(got_dir)["steps"] == STEPS
    ref_losses, got_losses = losses(ref_dir), losses(got_dir)
    assert len(ref_losses) == STEPS and got_losses == ref_losses
    ref, got = load_weights(ref_dir / "model.safetensors"), load_weights(got_dir / "model.safetensors")
    assert ref.keys() == got.keys() and len(ref) > 10
    for key in ref:
        assert torch.equal(ref[key], got[key]), f"{key} differs by {(ref[key] - got[key]).abs().max().item():.3g}"
    # the schedule really moved sub-groups (a plan of 0 device sub-groups would pass trivially)
    plan = re.search(r"interleaved offload plan \('?[\w.]+'?\): (\d+)/(\d+) sub-groups on the device", log)
    assert plan, log[-3000:]
    on_device, total = int(plan.group(1)), int(plan.group(2))
    assert total >= 8
    if fraction == "0.5":
        assert 0 < on_device < total
    # auto may move sub-groups when measurements drift (equality must hold across that), but a
    # bounded number of times (max_replans=4), not every few steps as the first version did
    assert len(re.findall(r"re-planned \(", log)) <= 4, log[-3000:]


@pytest.mark.multirank
@pytest.mark.slow  # reuses the runs above
def test_offload_stats_are_in_metrics_csv(runs):
    rows = read_metrics(runs["0.5"][0])
    assert len(rows) == STEPS
    for r in rows:
        assert 0.0 < float(r["offload_device_fraction"]) < 1.0
        assert float(r["offload_predicted_update_s"]) > 0 and float(r["offload_measured_update_s"]) > 0
        assert int(r["offload_replans"]) == 0  # a fixed fraction never moves sub-groups
    # without interleaved offload the columns are there and empty
    assert all(r["offload_device_fraction"] == "" for r in read_metrics(runs["cpu"][0]))


@pytest.mark.multirank
@pytest.mark.slow  # reuses the runs above
def test_partial_offload_trains_through_deepspeed_ratio(runs):
    run_dir, log = runs["partial"]
    assert summary(run_dir)["status"] == "finished" and summary(run_dir)["steps"] == STEPS, log[-3000:]
    got = [float(loss) for _, loss in losses(run_dir)]
    assert len(got) == STEPS and all(x == x for x in got)
    # same data and seed as stock cpu offload; only where Adam runs differs (device for 1/4 of the state)
    ref = [float(loss) for _, loss in losses(runs["cpu"][0])]
    assert got[0] == ref[0]  # the first loss is before any update
    assert abs(got[-1] - ref[-1]) < 0.05 * abs(ref[-1]), (got, ref)
