"""Two corrections to DeepSpeed 0.19's ZeRO-3 load of a universal checkpoint
(`DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`):

- it copies the hyperparameters of the *first* saved param group onto every param group
  ("Generally, the hyperparameters of each parameter should be the same"). distvit's optimizer has
  two groups, with and without weight decay (norms, biases, position embeddings, tokens:
  engine/optim.py), so after a reshape the no-decay group decayed too;
- it gives every sub-group's optimizer state the *same* `step` tensor object. torch's Adam
  increments `step` in place once per sub-group it steps, so the count ran ahead by the number of
  sub-groups each step and the bias correction drifted (~1e-4 in the loss one step after a reshape,
  ~3e-3 six steps later: tests/test_reshape.py).

ZeRO-1/2 restore each group from its own saved group, each with its own step (runtime/base_optimizer.py);
this does the same for ZeRO-3, from the same zero/optimizer_state.pt, read as data (checkpoint/safe_load.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from distvit.checkpoint import safe_load


def fix_loaded_state(engine, tag_dir: Path) -> None:
    """After engine.load_checkpoint(load_universal): per-group hyperparameters, one step tensor per sub-group."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    state = safe_load.load(Path(tag_dir) / "zero" / "optimizer_state.pt")
    saved = state.get(OPTIMIZER_STATE_DICT, state)["param_groups"]  # ZeRO-3 nests it, as its loader reads it
    zero = engine.optimizer
    groups = zero.optimizer.param_groups
    if len(saved) != len(groups):
        raise RuntimeError(f"{tag_dir}: the universal checkpoint has {len(saved)} optimizer param groups, this "
                           f"run's optimizer {len(groups)}; was it saved with other model.freeze or optim settings?")
    for group, old in zip(groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})
    for flat in zero.fp32_partitioned_groups_flat:
        per_param = zero.optimizer.state.get(flat)
        if per_param and torch.is_tensor(per_param.get("step")):
            per_param["step"] = per_param["step"].clone()
