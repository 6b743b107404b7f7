"""The optimizer that fits the run: AdamW with weight-decay groups.

- no decay on norms, biases, position embeddings and class/distillation tokens (1-D tensors and
  the names a model lists in `no_weight_decay()`), as timm and DeiT do;
- DeepSpeedCPUAdam when the optimizer state lives on the CPU (offload), as DeepSpeed requires;
- FusedAdam on CUDA when its kernel builds, else torch's fused AdamW; torch AdamW on the CPU.
"""
from __future__ import annotations

import torch

from distvit.config import Config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.endswith(".bias") or any(name.startswith(s + ".") for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if cfg.parallel.offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if device.type == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except Exception:  # kernel could not be built here: torch's fused AdamW is as fast
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)
