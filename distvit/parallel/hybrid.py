"""Hybrid sequence parallelism: Ulysses inside groups of `ulysses_size` ranks, ring attention across them.

    ulysses_group, ring_group = hybrid_groups(sp_group, ulysses_size=2)   # collective, every rank
    o_local = hybrid_attention(q, k, v, ulysses_group, ring_group)

The sp ranks hold contiguous token shards (sp rank r: tokens [r*T/sp, (r+1)*T/sp)). Rank r sits in
Ulysses group r // u (u consecutive ranks) and ring group r % u (ranks r % u, r % u + u, ...).
DeepSpeed's DistributedAttention (the Ulysses all-to-all) turns the u shards of a Ulysses group
into one contiguous block of u*T/sp tokens for H/u heads; ring attention runs over the sp/u
blocks of the ring group for those heads; the all-to-all turns the result back. So sp can
exceed the head count: heads need only divide by u (sp = 4 with 2 heads: u = 2, ring of 2).
Padding (T not divisible by sp) and packed sequences both travel as segment ids (-1 = padding),
so the ring's key masking never depends on where the block boundaries fall.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from distvit.parallel.sequence_parallel import _check_qkv, group_size, ring_attention, ulysses_attention


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def hybrid_groups(group, ulysses_size: int):
    """(Ulysses group, ring group) of this rank inside the sp `group`; call on every rank of the job
    (it enumerates every sp group of the job, so that all ranks create the same groups in the same order)."""
    sp = group_size(group)
    if ulysses_size < 1 or sp % ulysses_size:
        raise ValueError(f"parallel.ulysses_size={ulysses_size} does not divide parallel.sp_size={sp} (hybrid sp "
                         f"runs Ulysses inside groups of ulysses_size ranks); choose one of {_divisors(sp)}")
    mine = [r if group is None else dist.get_global_rank(group, r) for r in range(sp)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    me, uly, ring = dist.get_rank(), None, None
    for members in sorted({tuple(m) for m in everyone}):
        for i in range(sp // ulysses_size):
            ranks = list(members[i * ulysses_size:(i + 1) * ulysses_size])
            g = dist.new_group(ranks)
            uly = g if me in ranks else uly
        for j in range(ulysses_size):
            ranks = list(members[j::ulysses_size])
            g = dist.new_group(ranks)
            ring = g if me in ranks else ring
    return uly, ring


def hybrid_attention(q, k, v, ulysses_group, ring_group, *, causal: bool = False, backend: str = "auto",
                     scale: float | None = None, seq_len: int | None = None, seq_ids=None):
    """Attention over the whole sequence sharded contiguously over the u x (sp/u) ranks; see the module doc.

    q, k, v: (B, H, T_local, D); seq_len: the real token count when the sequence was padded at its
    end; seq_ids: this rank's segment ids of a packed sequence (block-diagonal attention).
    """
    u, rings = group_size(ulysses_group), group_size(ring_group)
    world = u * rings
    real = _check_qkv("hybrid_attention", q, k, v, world, seq_len, "contiguous")
    if q.shape[1] % u:
        raise ValueError(f"hybrid_attention: {q.shape[1]} attention heads cannot be split over "
                         f"parallel.ulysses_size={u} ranks; use a ulysses_size in {_divisors(q.shape[1])} (the ring takes the rest of sp)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    local = q.shape[2]
    if seq_ids is None and not causal and real < local * world:
        # Padding as segment ids: the block boundaries of the ring need not match the padding.
        sp_rank = dist.get_rank(ring_group) * u + dist.get_rank(ulysses_group) if world > 1 else 0
        pos = torch.arange(sp_rank * local, (sp_rank + 1) * local, device=q.device)
        seq_ids = torch.where(pos < real, 0, -1)

    def ring(q_, k_, v_, ids):
        return ring_attention(q_, k_, v_, ring_group, causal=causal, backend=backend, scale=scale, seq_ids=ids)

    return ulysses_attention(q, k, v, ulysses_group, causal=causal, backend=backend, scale=scale, seq_ids=seq_ids,
                             _inner=ring)
