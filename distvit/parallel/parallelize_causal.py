"""Sequence parallelism for the causal ViT (models/causal_vit.py): its N tokens split over an sp group.

    parallelize_causal(model, mesh.sp_group, impl="ring")   # zigzag layout; or impl="ulysses"
    loss = model.loss(images)       # the full-image loss on every sp rank; loss.backward()
    pred = model(images)            # (B, N, patch_dim), the one-process predictions, on every rank

- Layout. Ring attention uses the zigzag layout (rank r holds chunks r and 2*sp-1-r of the
  sequence cut into 2*sp chunks): under the causal mask every rank then does the same attention
  work. Ulysses gathers the whole sequence for heads/sp heads, so each rank's causal work is
  balanced by construction; it shards contiguously. Tokens past N (end padding to the layout's
  multiple) are zero, come after every real token (hidden by the causal mask) and are dropped.
- Embedding. Rank r embeds only its positions: position 0 is the start token, position p >= 1
  patch p - 1; every rank uses the start token, patch_embed and pos_embed in its graph (with
  zero weight where it holds none of them) so every rank's gradient hooks run, in the same order.
- Attention. Every block's Attention.attend is replaced by the sp attention of parallelize.py
  (SequenceParallelPlan / SequenceParallelAttend: reused, causal read from the module).
- Loss. Each rank sums the squared errors of its real tokens and divides by the full count; the
  sum over the group is the full MSE. The sum's backward is the identity (the replicated-result
  convention of parallelize.py), so each rank's parameters get its tokens' part of the gradient.
- Gradients. grad_sync="allreduce" (default): a hook on every parameter sums its gradient over
  sp before accumulation (every parameter of this model is used on the sharded tokens), so every
  sp rank holds the full gradient: reduce over dp only (deepspeed_mpu(mesh, "allreduce")).
  grad_sync="partial": no sp communication; the sum over the group is the full gradient
  (DeepSpeed's own sequence parallelism, deepspeed_mpu(mesh, "partial")).

Incremental decoding (step / generate, the KV cache) is not sharded: decode with a model that
is not sequence-parallel (the same weights: load its state dict).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distvit.parallel.sequence_parallel import gather_tokens, group_size, local_positions
from distvit.models.causal_vit import CachedAttention, CausalViT
from distvit.models.layers import DropPath
from distvit.parallel.parallelize import (
    GRAD_SYNCS, GroupSharedDropPath, SequenceParallelAttend, SequenceParallelPlan, SumReplicated,
    broadcast_parameters,
)

IMPLS = {"ring": "zigzag", "ulysses": "contiguous"}


def parallelize_causal(model: CausalViT, mesh_or_group=None, impl: str = "ring", *,
                       grad_sync: str = "allreduce") -> CausalViT:
    """Split a CausalViT's tokens over an sp group, in place; returns the model.

    mesh_or_group: a distvit.parallel.mesh.Mesh (its sp_group), a process group, or None (the whole
    world). impl: "ring" (zigzag layout, any head count) or "ulysses" (heads must divide by sp).
    grad_sync: "allreduce" or "partial" (module doc). With sp = 1 nothing changes. Every sp rank
    must call this on the same model before the optimizer or DeepSpeed sees it.
    """
    if impl not in IMPLS:
        raise ValueError(f"parallelize_causal: impl={impl!r} (parallel.sp_impl); choose one of {', '.join(IMPLS)}")
    if grad_sync not in GRAD_SYNCS:
        raise ValueError(f"parallelize_causal: grad_sync={grad_sync!r}; choose one of {', '.join(GRAD_SYNCS)}")
    if not isinstance(model, CausalViT):
        raise TypeError(f"parallelize_causal: got a {type(model).__name__}; it shards distvit.models.causal_vit."
                        "CausalViT (use parallelize_sequence for a VisionTransformer)")
    if getattr(model, "sequence_parallel", None) is not None:
        raise ValueError("parallelize_causal: this model is already sequence-parallel; call it once per model")
    group = getattr(mesh_or_group, "sp_group", mesh_or_group)
    sp = group_size(group)
    if sp == 1:
        return model
    heads = model.cfg.num_heads
    if impl == "ulysses" and heads % sp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(f"parallelize_causal: parallel.sp_size={sp} does not divide the model's {heads} attention "
                         f"heads, which Ulysses splits over the sp ranks; use parallel.sp_size in {divisors} or "
                         "parallel.sp_impl=ring (any head count)")
    plan = SequenceParallelPlan(group, sp, dist.get_rank(group), impl, IMPLS[impl], grad_sync)
    broadcast_parameters(model, plan)
    for blk in model.blocks:
        if not isinstance(blk.attn, CachedAttention) or not blk.attn.causal:
            raise TypeError(f"parallelize_causal: a block's attention is a {type(blk.attn).__name__}; it must be "
                            "causal_vit.CachedAttention (causal), whose `attend` sequence parallelism replaces")
        blk.attn.attend = SequenceParallelAttend(blk.attn, plan, model)
        for name in ("drop_path1", "drop_path2"):  # one mask per image for the whole group, drawn on sp rank 0
            if isinstance(getattr(blk, name), DropPath):
                setattr(blk, name, GroupSharedDropPath(getattr(blk, name).drop_prob, plan))
    if grad_sync == "allreduce":
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(_sum_over(plan.group))
    model.sequence_parallel = plan
    model.__class__ = _CLASSES.setdefault(type(model), type(f"SequenceParallel{type(model).__name__}",
                                                            (SequenceParallelCausalViT, type(model)), {}))
    return model


def _sum_over(group):
    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad
    return hook


class SequenceParallelCausalViT:
    """Mixed into the model's class by parallelize_causal (see the module doc)."""

    def _positions(self) -> torch.Tensor:
        plan = self.sequence_parallel
        return local_positions(self.num_patches, plan.sp_rank, plan.sp_size, plan.layout).to(self.pos_embed.device)

    def _local_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """This rank's position-embedded tokens (B, T_pad/sp, D) in layout order; padding is zero."""
        n = self.num_patches
        patches = self.patchify(images)
        pos = self._positions()
        real = (pos < n)[None, :, None]
        pos = pos.clamp(max=n - 1)
        emb = self.patch_embed(patches[:, (pos - 1).clamp(min=0)])
        start = self.start_token.to(emb.dtype).expand_as(emb)
        tokens = torch.where((pos == 0)[None, :, None], start, emb) + self.pos_embed[:, pos]
        return tokens * real

    def forward_local(self, images: torch.Tensor) -> torch.Tensor:
        """Predictions of this rank's positions (B, T_pad/sp, patch_dim); padded positions are garbage."""
        return self.forward_tokens(self._local_tokens(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """All predictions (B, N, patch_dim), gathered on every rank (differentiable, replicated result)."""
        plan = self.sequence_parallel
        return gather_tokens(self.forward_local(images), 1, plan.group, seq_len=self.num_patches, layout=plan.layout)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The full-image MSE on every rank, from this rank's tokens (no gather of predictions)."""
        plan = self.sequence_parallel
        pos = self._positions()
        real = pos < self.num_patches
        pred = self.forward_local(images)[:, real]
        target = self.patchify(images)[:, pos[real]]
        local = (pred - target).pow(2).sum() / (images.shape[0] * self.num_patches * self.patch_dim)
        return SumReplicated.apply(local, plan.group)

    def step(self, patches, cache):
        raise NotImplementedError("CausalViT.step: incremental decoding of a sequence-parallel model is not "
                                  "implemented; decode with an unsharded CausalViT holding the same weights "
                                  "(load this model's state_dict into a fresh one)")


_CLASSES: dict[type, type] = {}
