"""Sequence-parallel attention: the tokens of one sample are split over the ranks of a group.

    o_local = ulysses_attention(q, k, v, group, causal=False)
    o_local = ring_attention(q, k, v, group, causal=True, layout="zigzag")

q, k, v are this rank's tokens, (batch, heads, local_tokens, head_dim); the output is this
rank's tokens of the full-sequence attention, same layout. Both are differentiable.

Layouts (which global tokens rank r of `world` holds; T_pad = T padded as below):
- "contiguous" (the default): tokens [r * T_pad/world, (r+1) * T_pad/world).
- "zigzag" (ring, causal load balance): the sequence cut into 2*world chunks; rank r holds
  chunks r and 2*world-1-r, in that order. Under a causal mask every rank then does the same
  work, where the contiguous layout gives the last rank `world` times the first one's.

Padding policy, for token counts that the layout does not divide: the sequence is padded at
its end to a multiple of `world` (contiguous) or `2 * world` (zigzag), so every rank holds the
same number of tokens (the all-to-all and the ring need equal blocks). Pass the real count as
`seq_len`: padded tokens are then never attended as keys; as queries they produce finite values
that the caller drops (`gather_tokens` / `zigzag_unshard` strip them). Under a causal mask the
pads come after every real token, so they are hidden by the mask itself. `shard_tokens` pads
and slices; `gather_tokens` gathers and strips.

Ulysses (DeepSpeed-Ulysses) runs on DeepSpeed's own `deepspeed.sequence.layer.DistributedAttention`:
an all-to-all turns the token split into a heads split, each rank attends over the full sequence
for heads/world heads through `distvit.attention.attention`, and a second all-to-all turns it
back; the backward is the same all-to-alls reversed (DeepSpeed's `_SeqAllToAll`). heads must be
divisible by world (see `ulysses_attention`).

Ring attention: each rank keeps its queries and passes its K/V block around the ring with
batched isend/irecv, overlapped with the attention of the block it holds; the per-block
(o, lse) partials are merged exactly (merge.py). The backward runs the ring again: K/V travel
as in the forward and the dK/dV accumulators travel with them, so after `world` steps every
block's gradient, summed over all ranks' queries, is back on its owner. Nothing is gathered:
per-rank memory is O(local_tokens), communication per rank is (world - 1) K/V blocks forward,
and (world - 1) K/V blocks plus `world` dK/dV blocks backward.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from distvit.attention.backends import attention
from distvit.attention.merge import merge_two
from distvit.attention.packed import check_ids, ring_pieces
from distvit.attention.ring_kernels import _piece_backward, _piece_forward
from distvit.parallel import op_load

LAYOUTS = ("contiguous", "zigzag")


# --- layouts ------------------------------------------------------------------------------------


def padded_length(seq_len: int, world: int, layout: str = "contiguous") -> int:
    """The sequence length after end padding: a multiple of world (contiguous) or 2*world (zigzag)."""
    _check_layout(layout)
    multiple = world * (2 if layout == "zigzag" else 1)
    return -(-seq_len // multiple) * multiple


def local_positions(seq_len: int, rank: int, world: int, layout: str = "contiguous") -> torch.Tensor:
    """Global token positions held by `rank` (positions >= seq_len are padding), in local order."""
    total = padded_length(seq_len, world, layout)
    if layout == "contiguous":
        per_rank = total // world
        return torch.arange(rank * per_rank, (rank + 1) * per_rank)
    chunk = total // (2 * world)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    second = torch.arange((2 * world - 1 - rank) * chunk, (2 * world - rank) * chunk)
    return torch.cat([first, second])


def _pad_to(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def shard_tokens(x: torch.Tensor, dim: int, rank: int, world: int, *, layout: str = "contiguous") -> torch.Tensor:
    """This rank's tokens of the full sequence x (tokens along `dim`), zero-padded at the end."""
    _check_layout(layout)
    if layout == "zigzag":
        return zigzag_shard(x, dim, rank, world)
    total = padded_length(x.shape[dim], world, layout)
    per_rank = total // world
    return _pad_to(x, dim, total).narrow(dim, rank * per_rank, per_rank)


def zigzag_shard(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Chunks r and 2*world-1-r of x (cut into 2*world chunks after end padding), concatenated."""
    total = padded_length(x.shape[dim], world, "zigzag")
    chunks = _pad_to(x, dim, total).chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shards, dim: int, seq_len: int | None = None) -> torch.Tensor:
    """The full sequence back from every rank's zigzag shard (a list in rank order), padding stripped."""
    firsts, seconds = zip(*(s.chunk(2, dim=dim) for s in shards))
    full = torch.cat(list(firsts) + list(reversed(seconds)), dim=dim)
    return full if seq_len is None else full.narrow(dim, 0, seq_len)


def unshard_tokens(shards, dim: int, seq_len: int | None = None, *, layout: str = "contiguous") -> torch.Tensor:
    """The full sequence from every rank's shard (a list in rank order), padding stripped."""
    _check_layout(layout)
    if layout == "zigzag":
        return zigzag_unshard(shards, dim, seq_len)
    full = torch.cat(list(shards), dim=dim)
    return full if seq_len is None else full.narrow(dim, 0, seq_len)


class _GatherTokens(torch.autograd.Function):
    """All-gather of token shards. The result is replicated, so its gradient is too: each rank
    keeps its own slice of the (identical) incoming gradient, no communication backward."""

    @staticmethod
    def forward(ctx, x, dim, group, seq_len, layout):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.dim, ctx.rank, ctx.world, ctx.layout, ctx.local = dim, rank, world, layout, x.shape[dim]
        return unshard_tokens(parts, dim, seq_len, layout=layout)

    @staticmethod
    def backward(ctx, grad):
        total = ctx.local * ctx.world
        padded = _pad_to(grad, ctx.dim, total)
        return shard_tokens(padded, ctx.dim, ctx.rank, ctx.world, layout=ctx.layout), None, None, None, None


def gather_tokens(x: torch.Tensor, dim: int, group=None, *, seq_len: int | None = None,
                  layout: str = "contiguous") -> torch.Tensor:
    """The full sequence on every rank from each rank's shard; padding beyond seq_len stripped.

    Differentiable under the replicated-result convention: every rank computes the same thing
    from the gathered tensor, so the gradient of rank r's shard is rank r's slice of it.
    """
    _check_layout(layout)
    if group_size(group) == 1:
        return x if seq_len is None else x.narrow(dim, 0, seq_len)
    return _GatherTokens.apply(x, dim, group, seq_len, layout)


def group_size(group=None) -> int:
    """Ranks in `group`; 1 when torch.distributed is not initialised (a single process)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def gather_ids(seq_ids, q, group, stack: bool = False) -> torch.Tensor:
    """Every rank's segment ids (1 or B, T_local) gathered over `group`: concatenated along the tokens
    (the gathered sequence of Ulysses), or stacked (world, 1 or B, T_local) with stack=True."""
    ids = check_ids(q, q, seq_ids, None)[0].contiguous()
    if group_size(group) == 1:
        return ids[None] if stack else ids
    parts = [torch.empty_like(ids) for _ in range(group_size(group))]
    dist.all_gather(parts, ids, group=group)
    return torch.stack(parts) if stack else torch.cat(parts, dim=1)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"sequence parallel: unknown layout={layout!r}; valid layouts: {', '.join(LAYOUTS)}")


def _check_qkv(name: str, q, k, v, world: int, seq_len: int | None, layout: str) -> int:
    """Validate the local blocks and return the real global token count."""
    for label, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: {label} has shape {tuple(t.shape)}; it must be 4-D "
                             "(batch, heads, local_tokens, head_dim)")
    if not (q.shape[:3] == k.shape[:3] == v.shape[:3]):
        raise ValueError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must hold the same "
                         "(batch, heads, local_tokens); sequence-parallel self-attention splits one sequence")
    local = q.shape[2]
    if layout == "zigzag" and local % 2:
        raise ValueError(f"{name}: layout='zigzag' needs an even local token count (two chunks per rank), got "
                         f"{local}; shard with zigzag_shard(x, dim, rank, world), which pads to a multiple of 2*world")
    if seq_len is None:
        return local * world
    if padded_length(seq_len, world, layout) != local * world:
        raise ValueError(
            f"{name}: seq_len={seq_len} padded for {world} ranks ({layout}) is {padded_length(seq_len, world, layout)} "
            f"tokens, but the ranks hold {world} x {local} = {local * world}; shard the sequence with "
            f"shard_tokens(x, dim, rank, world, layout={layout!r}) so every rank holds the padded share"
        )
    return seq_len


# --- Ulysses ------------------------------------------------------------------------------------


def _ensure_deepspeed_comm():
    """deepspeed.comm wraps the torch process group that is already up (DistributedAttention talks through it)."""
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        op_load.preload(op_load.SHM_COMM)  # a stale build lock would hang here (op_load.py)
        ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)


class _LocalAttention(torch.nn.Module):
    """What DistributedAttention calls between its all-to-alls: (B, T, h, D) in, (B, T, h, D) out.

    seq_ids: the gathered sequence's segment ids (packed sequences), or None. inner: the attention
    run on the gathered tokens (hybrid: ring attention across the Ulysses groups), or None.
    """

    def __init__(self, causal: bool, backend: str, scale: float | None, seq_len: int, seq_ids=None, inner=None):
        super().__init__()
        self.causal, self.backend, self.scale, self.seq_len = causal, backend, scale, seq_len
        self.seq_ids, self.inner = seq_ids, inner

    def forward(self, q, k, v, *args, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.inner is not None:
            return self.inner(q, k, v, self.seq_ids).transpose(1, 2)
        if self.seq_ids is None and not self.causal and self.seq_len < k.shape[2]:
            # The padding sits at the end of the gathered sequence: drop it from the keys.
            k, v = k[:, :, :self.seq_len], v[:, :, :self.seq_len]
        o = attention(q, k, v, causal=self.causal, scale=self.scale, backend=self.backend, seq_ids=self.seq_ids)
        return o.transpose(1, 2)


def ulysses_attention(q, k, v, group=None, *, causal: bool = False, backend: str = "auto",
                      scale: float | None = None, seq_len: int | None = None, seq_ids=None, _inner=None):
    """All-to-all sequence parallelism (DeepSpeed-Ulysses) in the contiguous layout.

    q, k, v: (B, H, T_local, D), rank r holding tokens [r*T_local, (r+1)*T_local) of the padded
    sequence; seq_len: the real token count when the sequence was padded (see the module doc).
    seq_ids (T_local,) or (B, T_local): this rank's segment ids of a packed sequence (-1 padding);
    attention is then block-diagonal per id. H must be divisible by the group size: each rank
    attends over H/world whole heads.
    """
    world = group_size(group)
    real = _check_qkv("ulysses_attention", q, k, v, world, seq_len, "contiguous")
    heads = q.shape[1]
    if heads % world:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"ulysses_attention: {heads} attention heads cannot be split over sp={world} ranks (Ulysses gives each "
            f"rank heads/sp whole heads); use an sp size that divides {heads} ({divisors}), or ring attention "
            f"(parallel.sp_impl=ring), which splits tokens only and takes any head count"
        )
    ids = None if seq_ids is None else gather_ids(seq_ids, q, group)
    local_attn = _LocalAttention(causal, backend, scale, real, ids, _inner)
    if world == 1:
        return local_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    _ensure_deepspeed_comm()
    from deepspeed.sequence.layer import DistributedAttention

    # DeepSpeed's layout is (B, T, H, D) with batch_dim_idx=0: scatter heads (2), gather tokens (1).
    sp_attention = DistributedAttention(local_attn, group, scatter_idx=2, gather_idx=1)
    o = sp_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)
    return o.transpose(1, 2)


# --- ring ---------------------------------------------------------------------------------------


def _ring_tasks(layout: str, causal: bool, rank: int, src: int, world: int, local: int, seq_len: int):
    """The (q_lo, q_hi, k_lo, k_hi, causal) pieces of local queries x block `src` that are not masked.

    Contiguous causal: own block causal, earlier blocks in full, later blocks not at all.
    Zigzag causal (chunks a=rank, b=2w-1-rank; block src has chunks src, 2w-1-src): own block
    causal; an earlier block's first chunk is seen by all local queries and its second by none;
    a later block is seen in full by the second local chunk and not at all by the first.
    Non-causal: every query sees every real key; keys past seq_len (end padding) are cut off.
    """
    if causal:
        if src == rank:
            return [(0, local, 0, local, True)]
        if layout == "contiguous":
            return [(0, local, 0, local, False)] if src < rank else []
        half = local // 2
        return [(0, local, 0, half, False)] if src < rank else [(half, local, 0, local, False)]
    if layout == "contiguous":
        valid = min(max(seq_len - src * local, 0), local)
        return [(0, local, 0, valid, False)] if valid else []
    half = local // 2
    tasks = []
    for offset, chunk in ((0, src), (half, 2 * world - 1 - src)):
        valid = min(max(seq_len - chunk * half, 0), half)
        if valid:
            tasks.append((0, local, offset, offset + valid, False))
    return tasks


class _Ring:
    """One rank's place in the ring of `group`: global ranks of its neighbours, batched P2P."""

    def __init__(self, group):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = self._global((self.rank + 1) % self.world)
        self.prev = self._global((self.rank - 1) % self.world)

    def _global(self, group_rank: int) -> int:
        # P2P ops address peers by global rank.
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def shift(self, send: torch.Tensor):
        """Start sending `send` to the next rank and receiving the previous rank's; returns (recv, requests)."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group), dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(requests) -> None:
        for r in requests:
            r.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout, backend, scale, seq_len, tasks=None):
        ring = _Ring(group)
        local = q.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)
        o = torch.zeros(q.shape[:3] + (v.shape[3],), dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            # The next block travels while this one is computed.
            incoming, requests = ring.shift(kv) if step < ring.world - 1 else (None, [])
            pieces = tasks[src] if tasks is not None else _ring_tasks(layout, causal, ring.rank, src, ring.world,
                                                                       local, seq_len)
            for piece in pieces:
                b, q_lo, q_hi, k_lo, k_hi, piece_causal = piece if len(piece) == 6 else (slice(None), *piece)
                o_p, lse_p = _piece_forward(q[b, :, q_lo:q_hi], kv[0, b, :, k_lo:k_hi], kv[1, b, :, k_lo:k_hi],
                                            piece_causal, scale, backend)
                o[b, :, q_lo:q_hi], lse[b, :, q_lo:q_hi] = merge_two(
                    o[b, :, q_lo:q_hi], lse[b, :, q_lo:q_hi], o_p.to(acc), lse_p.to(acc))
            ring.wait(requests)
            kv = incoming if incoming is not None else kv
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.group, ctx.causal, ctx.layout, ctx.scale, ctx.seq_len = group, causal, layout, scale, seq_len
        ctx.backend, ctx.tasks = backend, tasks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        local = q.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)
        do = do.contiguous()
        delta = (do.to(acc) * o.to(acc)).sum(-1)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv_in, dkv_requests = None, []
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            incoming, requests = ring.shift(kv) if step < ring.world - 1 else (None, [])
            dkv = torch.zeros((2,) + k.shape, dtype=acc, device=q.device)
            pieces = ctx.tasks[src] if ctx.tasks is not None else _ring_tasks(
                ctx.layout, ctx.causal, ring.rank, src, ring.world, local, ctx.seq_len)
            for piece in pieces:
                b, q_lo, q_hi, k_lo, k_hi, piece_causal = piece if len(piece) == 6 else (slice(None), *piece)
                rows = slice(q_lo, q_hi)
                dq_p, dk_p, dv_p = _piece_backward(q[b, :, rows], kv[0, b, :, k_lo:k_hi], kv[1, b, :, k_lo:k_hi],
                                                   o[b, :, rows], do[b, :, rows], lse[b, :, rows], delta[b, :, rows],
                                                   piece_causal, ctx.scale, ctx.backend)
                dq[b, :, rows] += dq_p
                dkv[0, b, :, k_lo:k_hi] += dk_p
                dkv[1, b, :, k_lo:k_hi] += dv_p
            # Block src's accumulator arrives from the previous rank (which added its part last step).
            ring.wait(dkv_requests)
            if dkv_in is not None:
                dkv += dkv_in
            dkv_in, dkv_requests = ring.shift(dkv)
            ring.wait(requests)
            kv = incoming if incoming is not None else kv
        # After world shifts each accumulator is home: it holds every rank's part of this rank's dK/dV.
        ring.wait(dkv_requests)
        return (dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype), None, None, None, None, None, None,
                None)


def ring_attention(q, k, v, group=None, *, causal: bool = False, layout: str = "contiguous", backend: str = "auto",
                   scale: float | None = None, seq_len: int | None = None, seq_ids=None):
    """Ring attention: K/V blocks passed around the ranks of `group`, exact (o, lse) merge.

    q, k, v: (B, H, T_local, D), this rank's tokens in `layout` ("contiguous" or "zigzag", see
    the module doc); seq_len: the real token count when the sequence was padded. Any head count.
    seq_ids (T_local,) or (B, T_local): this rank's segment ids of a packed sequence (-1 padding):
    only the (query run x key run) rectangles of equal ids are computed, so a block that shares
    no image with this rank's queries is passed on without any attention work.
    """
    _check_layout(layout)
    world = group_size(group)
    real = _check_qkv("ring_attention", q, k, v, world, seq_len, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if seq_ids is not None and causal:
        raise ValueError("ring_attention: seq_ids with causal=True is not supported; packed (block-diagonal) "
                         "sequences are bidirectional, pass causal=False")
    if world == 1:
        if seq_ids is not None:
            return attention(q, k, v, scale=scale, backend=backend, seq_ids=seq_ids)
        keys = real if not causal else k.shape[2]
        return attention(q, k[:, :, :keys], v[:, :, :keys], causal=causal, scale=scale, backend=backend)
    tasks = None
    if seq_ids is not None:
        tasks = ring_pieces(gather_ids(seq_ids, q, group, stack=True), dist.get_rank(group))
    return _RingAttention.apply(q, k, v, group, causal, layout, backend, scale, real, tasks)

