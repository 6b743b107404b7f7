"""A correction to DeepSpeed 0.19's ZeRO-3 load of a universal checkpoint: per-group hyperparameters.

`DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3` copies the
hyperparameters of the *first* saved param group onto every param group ("Generally, the
hyperparameters of each parameter should be the same"). distvit's optimizer has two groups, with and
without weight decay (norms, biases, position embeddings, tokens: engine/optim.py), so after a
reshape under ZeRO-3 the no-decay group decayed too: the step after the reshape drifted from plain
AdamW by ~1e-4 in the loss (tests/test_reshape.py). ZeRO-1/2 restore each group from its own saved
group (runtime/base_optimizer.py); this does the same for ZeRO-3, from the same
zero/optimizer_state.pt, read as data (checkpoint/safe_load.py).
"""
from __future__ import annotations

from pathlib import Path

from distvit.checkpoint import safe_load


def restore_group_hyperparameters(engine, tag_dir: Path) -> int:
    """Set every ZeRO-3 optimizer group's hyperparameters to its saved group's; returns groups set."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    state = safe_load.load(Path(tag_dir) / "zero" / "optimizer_state.pt")
    saved = state.get(OPTIMIZER_STATE_DICT, state)["param_groups"]  # ZeRO-3 nests it, as its loader reads it
    groups = engine.optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise RuntimeError(f"{tag_dir}: the universal checkpoint has {len(saved)} optimizer param groups, this "
                           f"run's optimizer {len(groups)}; was it saved with other model.freeze or optim settings?")
    for group, old in zip(groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})
    return len(groups)
