"""ZeRO-3 with sequence parallelism: weights partitioned over dp x sp, gradients summed over sp.

Two places where DeepSpeed 0.19's ZeRO-3 disagrees with its own ZeRO-1/2 (and with our "partial"
gradient convention, docs/sequence_parallel.md: sum over sp, average over dp) when an mpu has a
sequence-parallel group:

- partitioning: the optimizer shards over the sequence-data-parallel group (dp x sp), but a model
  not partitioned yet is partitioned over mpu.get_data_parallel_group() (dp only). Each rank then
  kept whole weights that the optimizer counted as 1/(dp x sp) shards: the sp ranks drifted apart
  and zero_to_fp32 failed on the checkpoint ("consumed 136010 numels out of 272020").
  We partition first, over the group ZeRO shards over.
- reduction: ZeRO-3's reduce-scatter averages over dp x sp, where ZeRO-1/2 divide by dp only
  (stage_1_and_2 / stage3's all-reduce path divide by world / sp_size). Each sp rank holds a
  partial gradient, so the average was the gradient / sp (grad norm logged exactly half of
  ZeRO-2's). A gradient hook multiplies by sp before DeepSpeed reduces.
"""
from __future__ import annotations

import torch


def prepare_zero3_sp(model: torch.nn.Module, ds_config: dict, mpu) -> None:
    """Call before deepspeed.initialize, for ZeRO-3 with an mpu whose sp size is > 1."""
    import deepspeed

    sp = mpu.get_sequence_parallel_world_size()
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(lambda g, sp=sp: g * sp)
    # DeepSpeed casts a model it partitions itself to bf16/fp16 first (engine._configure_distributed_model
    # skips that for a model partitioned already): cast it the same way.
    dtype = (torch.bfloat16 if ds_config.get("bf16", {}).get("enabled")
             else torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    if dtype != torch.float32:
        model.to(dtype)
    deepspeed.zero.Init(module=model, data_parallel_group=mpu.get_sequence_data_parallel_group(),
                        config_dict_or_path=ds_config, mpu=mpu, dtype=dtype)
