"""run.compile: torch.compile (inductor, C++ on the CPU) of the model inside the trainer on 2 ranks; the
compiled run must match the eager one within tolerance (inductor fuses and reorders float32 ops)."""
from __future__ import annotations

import pytest
import torch

from test_recipe_trainer import recipe_args
from trainer_helpers import launch, load_weights, losses, summary


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("stage,extra", [(2, ()), (3, ("parallel.activation_checkpointing=true",))])
def test_compiled_run_matches_eager(digits_dir, tmp_path, stage, extra):
    common = [f"parallel.zero_stage={stage}", "run.max_steps=3", *extra]
    launch(recipe_args(digits_dir, tmp_path, "eager", *common), timeout=600)
    launch(recipe_args(digits_dir, tmp_path, "compiled", *common, "run.compile=true"), timeout=900)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    torch.testing.assert_close(torch.tensor([float(v) for _, v in compiled]), torch.tensor([float(v) for _, v in eager]),
                               rtol=1e-4, atol=1e-5)
    a, b = load_weights(tmp_path / "eager" / "model.safetensors"), load_weights(tmp_path / "compiled" / "model.safetensors")
    assert set(a) == set(b)  # compiling in place keeps the parameter names (checkpoints, export)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
    print("wall_s eager", summary(tmp_path / "eager")["wall_s"], "compiled", summary(tmp_path / "compiled")["wall_s"])
