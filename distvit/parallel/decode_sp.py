"""Decode across sequence-parallel ranks: decode_attention_sp (a few query tokens against a KV cache
split along the sequence over a group) and ShardedKVCache (such a cache for the causal ViT).

    cache = ShardedKVCache.from_full(model.new_cache(B), group)   # after a prefill, or empty
    pred = model.forward_tokens(tokens, cache)                      # attention via decode_attention_sp

Layout (contiguous, the one decode_attention_sp expects): rank r of `world` holds cache positions
[r * C, (r + 1) * C), C = ceil(capacity / world). Every rank runs the whole model on the new
tokens (projections and MLP are replicated: decode is memory-bound on the cache, not compute);
only the keys and values are split, so each rank stores and reads 1/world of the cache. A new
token's key goes to the rank that owns its position; attention is each rank's partial (o, lse)
over its slice, merged exactly across ranks after one all_gather (decode_attention_sp below).

Why contiguous and not zig-zag here: decoding appends at the end, so contiguous slices fill
one rank after another and the merge needs no reordering; the zig-zag layout balances causal
*training* work (parallel/parallelize_causal.py), which a single decode query does not have.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distvit.attention.decode import decode_attention
from distvit.attention.merge import merge_partials
from distvit.models.causal_vit import KVCache


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


class ShardedKVCache(KVCache):
    """KVCache whose positions are split over `group` (module doc); seqlens stay global (replicated)."""

    holds_whole_sequences = False  # decode only (<= 16 new tokens); prefill into a whole KVCache first

    def __init__(self, num_layers: int, batch: int, heads: int, capacity: int, head_dim: int, group=None,
                 dtype: torch.dtype = torch.float32, device=None, backend: str = "auto"):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.chunk = -(-capacity // self.world)
        self.start = self.rank * self.chunk
        self.total_capacity = capacity
        super().__init__(num_layers, batch, heads, self.chunk, head_dim, dtype, device, backend)

    @classmethod
    def from_full(cls, full: KVCache, group=None) -> "ShardedKVCache":
        """This rank's slice of a whole cache (e.g. after a replicated prefill), with its seqlens."""
        L, B, H, T, D = full.k.shape
        cache = cls(L, B, H, T, D, group, full.k.dtype, full.k.device, full.backend)
        piece = slice(cache.start, min(cache.start + cache.chunk, T))
        width = piece.stop - piece.start
        if width > 0:
            cache.k[:, :, :, :width] = full.k[:, :, :, piece]
            cache.v[:, :, :, :width] = full.v[:, :, :, piece]
        cache.seqlens.copy_(full.seqlens)
        return cache

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Store the new tokens' keys/values on the rank that owns their positions (others skip them)."""
        n = k_new.shape[2]
        pos = self.seqlens.long()[:, None] + torch.arange(n, device=self.seqlens.device)[None, :] - self.start
        mine = (pos >= 0) & (pos < self.chunk)
        b, t = mine.nonzero(as_tuple=True)
        if b.numel():
            self.k[layer][b, :, pos[b, t]] = k_new.transpose(1, 2)[b, t].to(self.k.dtype)
            self.v[layer][b, :, pos[b, t]] = v_new.transpose(1, 2)[b, t].to(self.v.dtype)

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        end = self.seqlens + q.shape[2]  # global tokens each sequence holds once the new ones are in
        local = (end - self.start).clamp(0, self.chunk).to(torch.int32)
        after = (end - self.start - self.chunk).clamp(min=0).to(torch.int32)
        return decode_attention_sp(q, self.k[layer], self.v[layer], local, self.group, keys_after=after,
                                   backend=self.backend, scale=scale)
