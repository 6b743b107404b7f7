"""Sequence parallelism for the ViT: one image's tokens split over the ranks of an sp group.

    parallelize_sequence(model, mesh.sp_group, impl="ulysses")   # or "ring", or "hybrid" + ulysses_size
    logits = model(images)        # or model.forward_packed(packed): every sp rank, same inputs, same logits
    loss = criterion(logits, labels); loss.backward()

The model file stays pure PyTorch; this module rewires an existing VisionTransformer in place:

- Tokens. The sequence is [class token, patch 0, ..., patch N-1] (T = prefix + N tokens). Rank r
  of sp holds the tokens of the sequence-parallel layout (contiguous: [r*T_pad/sp, (r+1)*T_pad/sp),
  see distvit.parallel.sequence_parallel). The class token therefore lives on rank 0 only, as
  the first token of its shard; it is not replicated (a replicated class token would be a key
  on every rank and be counted sp times). When sp does not divide T, the sequence is padded at
  its end with zero tokens that are never attended as keys and never pooled.
- Embedding. Each rank runs the patch convolution on the image rows holding its patches only
  (at most two patch rows more than its share) and adds its slice of pos_embed.
- Attention. Every block's `Attention.attend` (the model's seam between the projections and
  the kernel) is replaced by ulysses_attention or ring_attention over the sp group.
- Pooling. "token": the class token's output is summed over the group (rank 0 holds it, the
  others add zeros); "avg": each rank sums its real patch tokens, the sums are added over the
  group and divided by N. The all-reduce's backward is the identity, which is exact because
  everything after it (fc_norm, head, the loss) runs identically on every rank: every rank
  receives the same, complete gradient of the pooled features.
- Randomness. Stochastic depth drops whole samples (packed: whole images), and head dropout acts on the replicated
  pooled features, so their masks must agree over the group: they are drawn on sp rank 0 and
  broadcast. Token dropout (pos_drop, proj_drop) stays independent per token, as it should.

Gradients (grad_sync):
- "allreduce" (default): parameters used on the tokens (patch_embed, cls_token, pos_embed,
  blocks, norm) get only their own tokens' part of the gradient on each rank; a hook on each of
  them sums it over the sp group before it is accumulated into .grad. Parameters after the
  pooling (fc_norm, head) already receive the full gradient on every rank. So after backward
  every sp rank holds the full gradient of every parameter, identical over the group: reduce
  (average) over the data-parallel group only, as for a model that is not sequence-parallel.
- "partial": no sp communication of gradients. Token parameters keep their rank's part and
  the post-pooling parameters are scaled by 1/sp, so the SUM over the sp group is the full
  gradient. This is what DeepSpeed's own sequence-parallel reduction expects (it all-reduces
  over the dp x sp "sequence data parallel" group and divides by dp only).

`deepspeed_mpu(mesh, grad_sync)` returns the `mpu` to pass to deepspeed.initialize for each:
"allreduce" -> ZeRO partitions and averages over dp only (sp is shown to DeepSpeed as a model-
parallel group, so the gradient norm counts the replicated gradients once); "partial" ->
DeepSpeed's own sequence parallelism: ZeRO partitions over dp x sp ranks (sp times less
optimizer and gradient memory per rank) and sums over sp while averaging over dp, in its one
reduction. Both give the single-process training run (tests/test_sequence_parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from distvit.choices import SP_IMPLS
from distvit.models.layers import Attention, DropPath, PatchEmbed, image_mask_to_tokens
from distvit.models.vit import VisionTransformer
from distvit.parallel import comm
from distvit.parallel.mpu import GRAD_SYNCS, deepspeed_mpu  # noqa: F401  (deepspeed_mpu: the public name here too)
from distvit.parallel.hybrid import hybrid_attention, hybrid_groups
from distvit.parallel.parallelize_packed import forward_packed as forward_packed_sp
from distvit.parallel.sequence_parallel import (
    group_size, local_positions, ring_attention, ulysses_attention,
)

IMPLS = SP_IMPLS  # parallel.sp_impl


@dataclass
class SequenceParallelPlan:
    group: object
    sp_size: int
    sp_rank: int
    impl: str
    layout: str
    grad_sync: str
    hybrid: tuple = (None, None)  # (Ulysses group, ring group) for impl="hybrid"

    def attend(self, q, k, v, *, causal, scale, backend, seq_len, seq_ids=None):
        kw = dict(causal=causal, backend=backend, scale=scale, seq_len=seq_len, seq_ids=seq_ids)
        if self.impl == "ulysses":
            return ulysses_attention(q, k, v, self.group, **kw)
        if self.impl == "hybrid":
            return hybrid_attention(q, k, v, *self.hybrid, **kw)
        return ring_attention(q, k, v, self.group, layout=self.layout, **kw)


def parallelize_sequence(model: nn.Module, mesh_or_group=None, impl: str = "ulysses", *, layout: str = "contiguous",
                         grad_sync: str = "allreduce", ulysses_size: int | None = None) -> nn.Module:
    """Split `model`'s tokens over an sp group, in place; returns the model.

    mesh_or_group: a distvit.parallel.mesh.Mesh (its sp_group is used), a process group, or None (the
    whole world). impl: "ulysses" (all-to-all; heads must divide by sp), "ring" (any head
    count) or "hybrid" (Ulysses in groups of ulysses_size ranks, ring across them; heads must
    divide by ulysses_size; collective over the whole job, see parallel/hybrid.py). layout: the
    ring's token layout ("contiguous" or "zigzag"; Ulysses is contiguous).
    grad_sync: "allreduce" or "partial", see the module doc. With sp = 1 nothing changes.
    Every sp rank must call this on the same model, before the optimizer or DeepSpeed sees it.
    """
    group = getattr(mesh_or_group, "sp_group", mesh_or_group)
    sp = group_size(group)
    if impl not in IMPLS:
        raise ValueError(f"parallelize_sequence: impl={impl!r} (parallel.sp_impl); choose one of {', '.join(IMPLS)}")
    if grad_sync not in GRAD_SYNCS:
        raise ValueError(f"parallelize_sequence: grad_sync={grad_sync!r}; choose one of {', '.join(GRAD_SYNCS)}")
    if impl in ("ulysses", "hybrid") and layout != "contiguous":
        raise ValueError(f"parallelize_sequence: layout={layout!r} with impl={impl!r}; Ulysses shards tokens "
                         "contiguously, use layout='contiguous' or impl='ring'")
    if impl == "hybrid" and not ulysses_size:
        raise ValueError("parallelize_sequence: impl='hybrid' needs ulysses_size= (parallel.ulysses_size, >= 1)")
    _check_model(model)
    if sp == 1:
        return model
    if impl == "ulysses" and model.num_heads % sp:
        divisors = [d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0]
        raise ValueError(
            f"parallelize_sequence: parallel.sp_size={sp} does not divide the model's {model.num_heads} attention "
            f"heads, which Ulysses splits over the sp ranks; use parallel.sp_size in {divisors} or "
            "parallel.sp_impl=ring (any head count)"
        )
    plan = SequenceParallelPlan(group, sp, dist.get_rank(group), impl, layout, grad_sync)
    if impl == "hybrid":
        if model.num_heads % ulysses_size:
            raise ValueError(f"parallelize_sequence: parallel.ulysses_size={ulysses_size} does not divide the model's "
                             f"{model.num_heads} attention heads; use a divisor of {model.num_heads} that divides sp")
        plan.hybrid = hybrid_groups(group, ulysses_size)
    broadcast_parameters(model, plan)
    for blk in model.blocks:
        blk.attn.attend = SequenceParallelAttend(blk.attn, plan, model)
        for name in ("drop_path1", "drop_path2"):
            if isinstance(getattr(blk, name), DropPath):
                setattr(blk, name, GroupSharedDropPath(getattr(blk, name).drop_prob, plan))
    if isinstance(model.head_drop, nn.Dropout) and model.head_drop.p > 0:
        model.head_drop = _GroupSharedDropout(model.head_drop.p, plan)
    _register_grad_sync(model, plan)
    model.sequence_parallel = plan
    model.__class__ = _sequence_parallel_class(type(model))
    return model


def _check_model(model) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"parallelize_sequence: got a {type(model).__name__}; token sharding is implemented for "
                        "distvit.models.vit.VisionTransformer (set parallel.sp_size=1 for other models)")
    if getattr(model, "sequence_parallel", None) is not None:
        raise ValueError("parallelize_sequence: this model is already sequence-parallel; call it once per model")
    if type(model.patch_embed) is not PatchEmbed:
        raise TypeError(f"parallelize_sequence: patch_embed is a {type(model.patch_embed).__name__}; the local patch "
                        "embedding assumes layers.PatchEmbed (one strided convolution)")
    for blk in model.blocks:
        if not isinstance(blk.attn, Attention):
            raise TypeError(f"parallelize_sequence: a block's attention is a {type(blk.attn).__name__}; it must be "
                            "layers.Attention, whose `attend` is the seam that sequence parallelism replaces")


# --- replicas and gradients ---------------------------------------------------------------------


def broadcast_parameters(model, plan) -> None:
    """Make the replicas identical over the sp group (sp rank 0's values), whatever each rank initialised."""
    # Runs before DeepSpeed moves the model: CPU tensors, which distvit.parallel.comm takes to the group's
    # device (CUDA under NCCL) in a few flat buckets and back.
    with torch.no_grad():
        comm.broadcast_many([t.data for t in list(model.parameters()) + list(model.buffers())],
                            src=_global_rank(plan.group, 0), group=plan.group)


def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _token_and_head_parameters(model):
    """(parameters used on the sharded tokens, parameters after the pooling); every parameter in one."""
    token_modules = [model.patch_embed, model.blocks, model.norm]
    token = [p for m in token_modules for p in m.parameters()]
    token += [p for p in (model.cls_token, model.pos_embed) if p is not None]
    head = [p for m in (model.fc_norm, model.head) for p in m.parameters()]
    seen = {id(p) for p in token + head}
    other = [n for n, p in model.named_parameters() if id(p) not in seen]
    if other:
        raise TypeError(f"parallelize_sequence: parameters {other} are neither on the token path nor after the "
                        "pooling; teach distvit/parallel/parallelize.py where they are used")
    return token, head


def _register_grad_sync(model, plan) -> None:
    token, head = _token_and_head_parameters(model)
    if plan.grad_sync == "allreduce":
        def sum_over_sp(grad):
            grad = grad.clone()
            dist.all_reduce(grad, group=plan.group)
            return grad

        for p in token:
            if p.requires_grad:
                # A tensor hook runs before the gradient is accumulated into .grad, so DeepSpeed's
                # post-accumulate hooks (and any optimizer) see the full gradient.
                p.register_hook(sum_over_sp)
    else:
        for p in head:
            if p.requires_grad:
                p.register_hook(lambda grad: grad / plan.sp_size)


class SumReplicated(torch.autograd.Function):
    """All-reduce (sum) whose result feeds identical computations on every rank: backward is the identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# --- attention, randomness ---------------------------------------------------------------------


class SequenceParallelAttend:
    """Replaces Attention.attend: same signature, attention over the whole sharded sequence.

    Reads causal, scale and the backend from the Attention module at call time, so
    model.set_attn_backend keeps working.
    """

    def __init__(self, attn: Attention, plan: SequenceParallelPlan, model: VisionTransformer):
        self.attn, self.plan, self.model = attn, plan, model

    def __call__(self, q, k, v, bias=None, seq_ids=None):
        if bias is not None:
            raise ValueError("sequence-parallel attention takes no attention bias (a bias over the full sequence "
                             "would have to be sharded too); run this model with parallel.sp_size=1")
        seq_len = None if seq_ids is not None else self.model.pos_embed.shape[1]
        return self.plan.attend(q, k, v, causal=self.attn.causal, scale=self.attn.scale,
                                backend=self.attn.attn_backend, seq_len=seq_len, seq_ids=seq_ids)


def _shared_mask(shape, keep: float, like: torch.Tensor, plan: SequenceParallelPlan) -> torch.Tensor:
    mask = like.new_empty(shape).bernoulli_(keep) if plan.sp_rank == 0 else like.new_empty(shape)
    dist.broadcast(mask, src=_global_rank(plan.group, 0), group=plan.group)
    return mask


class GroupSharedDropPath(nn.Module):
    """DropPath whose per-sample mask is drawn on sp rank 0 and shared by the group."""

    def __init__(self, drop_prob: float, plan: SequenceParallelPlan):
        super().__init__()
        self.drop_prob, self.plan = drop_prob, plan

    def forward(self, x, seq_ids=None):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        if seq_ids is not None:  # packed: one mask per image, over the images of every rank's shard
            # Sized from shapes alone, so no host read and no collective to agree on it: image ids
            # are 0..N-1 over the packed batch (models/packed.py), each image has at least one token,
            # and the sp ranks hold the batch's tokens in equal shares of seq_ids.numel(), so N <= slots.
            slots = seq_ids.numel() * self.plan.sp_size
            return x * image_mask_to_tokens(_shared_mask((slots,), keep, x, self.plan), seq_ids, x) / keep
        return x * _shared_mask((x.shape[0],) + (1,) * (x.dim() - 1), keep, x, self.plan) / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, shared over sp={self.plan.sp_size}"


class _GroupSharedDropout(nn.Module):
    """Dropout on replicated features: one mask, drawn on sp rank 0, used by the whole group."""

    def __init__(self, p: float, plan: SequenceParallelPlan):
        super().__init__()
        self.p, self.plan = p, plan

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        return x * _shared_mask(x.shape, keep, x, self.plan) / keep


# --- the forward ---------------------------------------------------------------------------------


class SequenceParallelViT:
    """Mixed into the model's class by parallelize_sequence: forward_features returns this rank's
    tokens (B, T_pad/sp, D), forward_head pools over the group; forward is unchanged."""

    def _local_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """This rank's position-embedded tokens in layout order: real tokens first, then zero padding."""
        plan, pe = self.sequence_parallel, self.patch_embed
        if images.dim() != 4 or images.shape[1] != pe.in_chans or tuple(images.shape[2:]) != pe.img_size:
            raise ValueError(f"PatchEmbed: input has shape {tuple(images.shape)}, expected (batch, {pe.in_chans}, "
                             f"{pe.img_size[0]}, {pe.img_size[1]})")
        prefix, seq_len = self.num_prefix_tokens, self.pos_embed.shape[1]
        positions = local_positions(seq_len, plan.sp_rank, plan.sp_size, plan.layout)
        real = positions[positions < seq_len]
        parts = []
        if self.cls_token is not None:
            # Every rank slices the class token (an empty slice off rank 0) so that it is in every
            # rank's graph and its gradient hook runs on every rank, in the same order.
            held = int((real < prefix).sum())
            parts.append(self.cls_token.expand(images.shape[0], -1, -1)[:, :held])
        for lo, hi in _runs(real[real >= prefix] - prefix):
            parts.append(self._embed_patches(images, lo, hi))
        x = torch.cat(parts, dim=1) + self.pos_embed[:, real.to(self.pos_embed.device)]
        x = self.pos_drop(x)
        pad = len(positions) - len(real)
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2])], dim=1)
        return x

    def _embed_patches(self, images: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Patch tokens lo..hi-1 (raster order) from the image rows that hold them only."""
        pe = self.patch_embed
        ph, pw = pe.patch_size
        cols = pe.grid_size[1]
        row_lo, row_hi = lo // cols, -(-hi // cols)
        tokens = pe.proj(images[:, :, row_lo * ph:row_hi * ph]).flatten(2).transpose(1, 2)
        return tokens[:, lo - row_lo * cols:hi - row_lo * cols]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(self._local_tokens(images))

    def forward_packed(self, packed) -> torch.Tensor:
        return forward_packed_sp(self, packed, SumReplicated.apply)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        plan = self.sequence_parallel
        prefix, seq_len = self.num_prefix_tokens, self.pos_embed.shape[1]
        positions = local_positions(seq_len, plan.sp_rank, plan.sp_size, plan.layout).to(x.device)
        if self.global_pool == "avg":
            patch = ((positions >= prefix) & (positions < seq_len)).to(x.dtype)
            local = (x * patch[None, :, None]).sum(dim=1)
            pooled = SumReplicated.apply(local, plan.group) / (seq_len - prefix)
        else:
            # The class token is global position 0: local token 0 of sp rank 0.
            holds = (positions[0] == 0).to(x.dtype)
            pooled = SumReplicated.apply(x[:, 0] * holds, plan.group)
        x = self.head_drop(self.fc_norm(pooled))
        return x if pre_logits else self.head(x)


def _runs(idx: torch.Tensor):
    """Maximal runs of consecutive integers in a sorted 1-D tensor, as (lo, hi) pairs."""
    values = idx.tolist()
    starts = [i for i, v in enumerate(values) if i == 0 or values[i - 1] != v - 1]
    return [(values[a], values[b - 1] + 1) for a, b in zip(starts, starts[1:] + [len(values)])]


_CLASSES: dict[type, type] = {}


def _sequence_parallel_class(base: type) -> type:
    """`base` with SequenceParallelViT's forward_features / forward_head (one class per base)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"SequenceParallel{base.__name__}", (SequenceParallelViT, base), {})
    return _CLASSES[base]
