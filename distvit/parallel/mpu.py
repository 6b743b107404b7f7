"""What DeepSpeed needs to know about the dp x sp mesh: the `mpu` handed to deepspeed.initialize.

grad_sync="allreduce" (every sp rank holds the full gradient, ZeRO over dp) or "partial" (DeepSpeed's
own sequence parallelism: ZeRO partitions and reduces over dp x sp), matching
parallelize_sequence(..., grad_sync=...) in parallelize.py.
"""
from __future__ import annotations

import torch.distributed as dist

GRAD_SYNCS = ("allreduce", "partial")


class _DataParallelOnlyMPU:
    """grad_sync="allreduce": gradients are complete and equal over sp; DeepSpeed reduces over dp only."""

    def __init__(self, mesh):
        self.mesh = mesh

    def get_data_parallel_group(self):
        return self.mesh.dp_group

    def get_data_parallel_world_size(self):
        return self.mesh.dp_size

    def get_data_parallel_rank(self):
        return self.mesh.dp_rank

    # sp as DeepSpeed's "model parallel" group: a gradient held by every sp rank (all of them
    # here) enters the global norm from model-parallel rank 0 only.
    def get_model_parallel_group(self):
        return self.mesh.sp_group

    def get_model_parallel_world_size(self):
        return self.mesh.sp_size

    def get_model_parallel_rank(self):
        return self.mesh.sp_rank


class _SequenceDataParallelMPU(_DataParallelOnlyMPU):
    """grad_sync="partial": DeepSpeed's sequence parallelism, ZeRO over the dp x sp ranks.

    DeepSpeed reads get_sequence_parallel_* (its sp size) and get_sequence_data_parallel_*
    (the group ZeRO partitions and reduces over, dividing by dp only). Model parallelism is
    none: a group of this rank alone.
    """

    def __init__(self, mesh, alone):
        super().__init__(mesh)
        self.alone = alone

    def get_sequence_parallel_group(self):
        return self.mesh.sp_group

    def get_sequence_parallel_world_size(self):
        return self.mesh.sp_size

    def get_sequence_parallel_rank(self):
        return self.mesh.sp_rank

    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self):
        return self.mesh.world_size

    def get_sequence_data_parallel_rank(self):
        return self.mesh.rank

    def get_model_parallel_group(self):
        return self.alone

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    # No tensor parallelism: DeepSpeed's universal-checkpoint load (ZeRO-1/2, a reshaped checkpoint)
    # asks for it to slice tensor-parallel fragments. Not on the class above: DeepSpeed prefers these
    # names to get_model_parallel_* wherever both exist (deepspeed/utils/bwc.py), and there the
    # "model parallel" group is sp, which the global norm needs.
    def get_tensor_model_parallel_world_size(self):
        return 1

    def get_tensor_model_parallel_rank(self):
        return 0


def deepspeed_mpu(mesh, grad_sync: str = "allreduce"):
    """The `mpu` for deepspeed.initialize that matches parallelize_sequence(..., grad_sync=grad_sync).

    mesh: a distvit.parallel.mesh.Mesh (dp_group, sp_group, dp/sp sizes and ranks; rank = dp_rank * sp +
    sp_rank, its world is the whole job). Collective for "partial" (it creates one single-rank
    group per rank): call it on every rank.
    """
    if grad_sync not in GRAD_SYNCS:
        raise ValueError(f"deepspeed_mpu: grad_sync={grad_sync!r}; choose one of {', '.join(GRAD_SYNCS)}")
    if grad_sync == "allreduce":
        return _DataParallelOnlyMPU(mesh)
    if mesh.world_size != dist.get_world_size():
        raise ValueError(f"deepspeed_mpu: the mesh spans {mesh.world_size} ranks but the job has "
                         f"{dist.get_world_size()}; DeepSpeed's sequence-data-parallel group is the whole job")
    alone = None
    for r in range(dist.get_world_size()):
        g = dist.new_group([r])
        if r == dist.get_rank():
            alone = g
    return _SequenceDataParallelMPU(mesh, alone)
