"""The two steps that turn a pure model into a distributed one: split its tokens over the sp
ranks (apply_sequence_parallel) and hand it to DeepSpeed (init_engine).

Kept apart from the Trainer so the trainer never names deepspeed or a parallelize function:
it builds a model, calls these two, and trains what comes back.
"""
from __future__ import annotations

import torch.nn as nn

from distvit.parallel.mesh import Mesh


def apply_sequence_parallel(model: nn.Module, mesh: Mesh, impl: str, *, ulysses_size: int | None = None):
    """Shard `model`'s tokens over mesh's sp group, in place; returns DeepSpeed's mpu (None at sp=1).

    grad_sync="partial": no gradient all-reduce over sp inside backward; DeepSpeed sums over sp
    and averages over dp in its one reduction, and ZeRO shards over dp x sp
    (docs/sequence_parallel.md). The causal ViT takes the zig-zag ring (balanced causal work).
    """
    if mesh.sp_size == 1:
        return None
    from distvit.models.causal_vit import CausalViT

    if isinstance(model, CausalViT):
        from distvit.parallel.parallelize_causal import parallelize_causal

        parallelize_causal(model, mesh, impl=impl, grad_sync="partial")
    else:
        from distvit.parallel.parallelize import parallelize_sequence

        parallelize_sequence(model, mesh, impl=impl, grad_sync="partial", ulysses_size=ulysses_size)
    from distvit.parallel.mpu import deepspeed_mpu

    return deepspeed_mpu(mesh, "partial")


def init_engine(model: nn.Module, optimizer, scheduler, ds_config: dict, mpu, zero_stage: int):
    """deepspeed.initialize, with ZeRO-3 x sp prepared first; returns the engine."""
    import deepspeed

    if mpu is not None and zero_stage == 3:
        # ZeRO-3 x sp: partition over dp x sp, sum gradients over sp (distvit/parallel/zero3_sp.py).
        from distvit.parallel.zero3_sp import prepare_zero3_sp

        prepare_zero3_sp(model, ds_config, mpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu)
    return engine
