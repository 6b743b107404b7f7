"""One rank: the per-step cuts of distvit/engine/step_tuning.py and the CPU ZeRO-2 knobs keep the numbers.

On one rank ZeRO-0 runs without DeepSpeed's backward all-reduce and with torch's foreach clip, and
ZeRO-2 on the CPU runs without contiguous gradients and without reduce-scatter (deepspeed_config.py):
each must still equal a single-process torch AdamW loop on the same batches. The 2-rank cases are
tests/test_trainer.py's.
"""
from __future__ import annotations

import pytest
import torch

from distvit.config import load_config
from distvit.parallel.deepspeed_config import build_ds_config
from test_trainer import STEPS, base_args
from trainer_helpers import launch, load_weights, losses, reference_run


def test_cpu_zero2_knobs_by_device_and_world_size():
    cfg = load_config(None, ["parallel.zero_stage=2"])
    one_cpu = build_ds_config(cfg, torch.device("cpu"), world_size=1)["zero_optimization"]
    assert one_cpu["contiguous_gradients"] is False and one_cpu["reduce_scatter"] is False
    assert one_cpu["overlap_comm"] is False
    two_cpu = build_ds_config(cfg, torch.device("cpu"), world_size=2)["zero_optimization"]
    assert two_cpu["contiguous_gradients"] is False and "reduce_scatter" not in two_cpu  # DeepSpeed's default
    cuda = build_ds_config(load_config(None, ["parallel.zero_stage=2", "parallel.precision=fp32"]),
                           torch.device("cuda"), world_size=1)["zero_optimization"]
    assert cuda["contiguous_gradients"] is True and cuda["overlap_comm"] is True
    assert cuda["reduce_scatter"] is False  # one rank: nothing to scatter to, on any device


@pytest.mark.slow  # two launches, ~80 s each on the loaded 2-core machine
@pytest.mark.multirank
@pytest.mark.parametrize("stage", [0, 2])
def test_one_rank_equals_single_process_adamw(digits_dir, tmp_path, stage):
    name = f"one_rank_z{stage}"
    args = base_args(digits_dir, tmp_path, name, f"parallel.zero_stage={stage}")
    launch(args, nproc=1)
    cfg = load_config("demo_digits", [a for a in args[3::2]])
    ref_state, ref_losses = reference_run(cfg, STEPS, dp_size=1)
    got = load_weights(tmp_path / name / "model.safetensors")
    assert set(got) == set(ref_state)
    for k, ref in ref_state.items():  # tolerances as in test_trainer.py (float32 rounding order only)
        torch.testing.assert_close(got[k], ref.float(), rtol=1e-4, atol=2e-5, msg=lambda m: f"{name} {k}: {m}")
    logged = [float(loss) for _, loss in losses(tmp_path / name)]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
