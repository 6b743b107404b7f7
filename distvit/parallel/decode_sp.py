"""Decode attention against a KV cache split over sequence-parallel ranks.

Each rank decodes its own slice of the cache with the local kernel (distvit.attention.decode);
the (o, lse) partials meet in one all_gather and merge exactly (distvit.attention.merge), the
same associative reduction the stream-K kernel uses inside one device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distvit.attention.decode import decode_attention
from distvit.attention.merge import merge_partials


def decode_attention_sp(q, k_local, v_local, local_seqlens=None, group=None, *, keys_after=None, backend="auto",
                        num_programs=None, scale=None, return_lse=False):
    """Decode against a KV cache split along the sequence over the ranks of `group`.

    Every rank passes the same q and its own slice of the cache: rank r holds positions that
    come before rank r + 1's (the contiguous layout of the sequence-parallel ranks). Each rank
    decodes its slice; the (o, lse) partials are merged exactly after one all_gather.

    local_seqlens: (B,) keys held by this rank (0 allowed). keys_after: (B,) keys held by the
    later ranks; needed for the causal bound when Tq > 1, and gathered from local_seqlens (a
    second, small all_gather) when not given. Returns what decode_attention returns.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if local_seqlens is None:
        local_seqlens = torch.full((q.shape[0],), k_local.shape[2], dtype=torch.int32, device=q.device)
    if keys_after is None and q.shape[2] > 1 and world > 1:
        lengths = [torch.empty_like(local_seqlens) for _ in range(world)]
        dist.all_gather(lengths, local_seqlens.contiguous(), group=group)
        keys_after = torch.stack(lengths[rank + 1:]).sum(0) if rank + 1 < world else torch.zeros_like(local_seqlens)
    o, lse = decode_attention(q, k_local, v_local, local_seqlens, backend=backend, num_programs=num_programs,
                              scale=scale, return_lse=True, keys_after=keys_after)
    if world > 1:
        # One collective: o (as float32) and lse travel together in one buffer.
        packed = torch.cat([o.float(), lse[..., None]], dim=-1).contiguous()
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        stacked = torch.stack(gathered)
        o, lse = merge_partials(stacked[..., :-1], stacked[..., -1])
        o = o.to(q.dtype)
    return (o, lse) if return_lse else o
