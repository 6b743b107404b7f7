"""DeepSpeed's own Adam kernels, where the optimizer builder (distvit/engine/optim.py) wants them:
the CPU Adam that optimizer offload steps on the host, and the fused CUDA Adam."""
from __future__ import annotations

import torch


def cpu_adamw(groups, **kwargs) -> torch.optim.Optimizer:
    """DeepSpeedCPUAdam in AdamW mode: what ZeRO offload runs on the host (its C++ op)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from distvit.parallel import op_load

    op_load.preload(op_load.CPU_ADAM)  # a stale build lock would hang DeepSpeedCPUAdam (op_load.py)
    return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)


def fused_adamw(groups, **kwargs) -> torch.optim.Optimizer:
    """DeepSpeed's FusedAdam on CUDA; torch's fused AdamW (as fast) when its kernel cannot be built here."""
    try:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    except Exception:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
