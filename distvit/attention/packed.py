"""Block-diagonal attention over packed sequences: the `seq_ids` path of distvit.attention.attention.

Several images share one sequence; each token carries its image's id and attends only to tokens
of the same id (-1: padding, never a key; a padding query returns o = 0, lse = -inf).

- math: the reference; the block mask joins the additive bias as -inf entries.
- sdpa: torch SDPA with a boolean (B, 1, Tq, Tk) mask (rows with no visible key are given a
  harmless full row and zeroed afterwards, so SDPA never sees an all-False row and returns NaN).
  With return_lse: the blockwise path of backends.py with the mask as a bias.
- flash: flash_attn_varlen_func over the id runs (cu_seqlens), B = 1, q and k the same tokens.

`segment_pieces` lists the dense (query run x key run) rectangles of two id vectors: ring
attention computes only those, so blocks the mask leaves empty are skipped.
"""
from __future__ import annotations

import torch

from distvit.attention import backends as B


def _as_2d(ids: torch.Tensor, name: str, batch: int, tokens: int) -> torch.Tensor:
    if not torch.is_tensor(ids) or ids.is_floating_point() or ids.dtype == torch.bool:
        got = ids.dtype if torch.is_tensor(ids) else type(ids).__name__
        raise TypeError(f"attention: {name} has dtype {got}; it must be an integer tensor of segment ids (-1: padding)")
    shape = tuple(ids.shape)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] != tokens or ids.shape[0] not in (1, batch):
        raise ValueError(f"attention: {name} has shape {shape}; it must be ({tokens},) or "
                         f"({batch}, {tokens}), one id per token")
    return ids


def check_ids(q, k, seq_ids, kv_seq_ids):
    """(q_ids, k_ids), each (1 or B, T), validated against q and k."""
    if seq_ids is None:
        raise ValueError("attention: kv_seq_ids without seq_ids; pass the queries' segment ids as seq_ids")
    if kv_seq_ids is None:
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"attention: seq_ids for {q.shape[2]} queries but k holds {k.shape[2]} tokens; pass "
                             "kv_seq_ids for the keys when they are other tokens than the queries")
        kv_seq_ids = seq_ids
    q_ids = _as_2d(seq_ids, "seq_ids", q.shape[0], q.shape[2]).to(q.device)
    k_ids = _as_2d(kv_seq_ids, "kv_seq_ids", q.shape[0], k.shape[2]).to(q.device)
    return q_ids, k_ids


def visible(q_ids: torch.Tensor, k_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, Tq, Tk): same id and the key is not padding."""
    return ((q_ids[:, :, None] == k_ids[:, None, :]) & (k_ids[:, None, :] >= 0)).unsqueeze(1)


def packed_attention(q, k, v, seq_ids, kv_seq_ids, *, causal, bias, scale, backend, return_lse):
    q_ids, k_ids = check_ids(q, k, seq_ids, kv_seq_ids)
    name = B.resolve_backend(backend, q, k, v, bias)
    if name == "flash" and backend == "auto" and (return_lse or kv_seq_ids is not None or q.shape[0] != 1):
        name = "sdpa"  # auto: flash varlen only where it applies
    if name == "flash":
        return _flash_varlen(q, k, v, q_ids, causal, scale, return_lse)
    keep = visible(q_ids, k_ids)
    if causal:
        keep = keep & B.causal_visible(0, q.shape[2], q.shape[2], k.shape[2], q.device)
    acc = B._acc_dtype(q.dtype)
    hide = torch.zeros(keep.shape, dtype=acc, device=q.device).masked_fill(~keep, float("-inf"))
    full_bias = hide if bias is None else hide + bias.to(acc)
    if name == "math":
        o, lse = B._math(q, k, v, False, full_bias, scale)
        return (o, lse) if return_lse else o
    if return_lse:
        return B._AttentionWithLse.apply(q, k, v, full_bias, False, scale, "blockwise")
    empty = ~keep.any(dim=-1, keepdim=True)  # (B, 1, Tq, 1)
    mask = keep | empty
    if bias is not None:
        hide = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        mask = hide + bias.to(q.dtype)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.masked_fill(empty, 0.0)


def runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values in a 1-D id tensor: [(id, lo, hi)]."""
    if ids.numel() == 0:
        return []
    change = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    starts = [0] + change.tolist()
    ends = change.tolist() + [ids.numel()]
    values = ids[torch.tensor(starts, device=ids.device)].tolist()
    return list(zip(values, starts, ends))


def segment_pieces(q_ids: torch.Tensor, k_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Dense rectangles (q_lo, q_hi, k_lo, k_hi) where a query run and a key run share an id >= 0."""
    by_id: dict[int, list[tuple[int, int]]] = {}
    for i, lo, hi in runs(k_ids):
        if i >= 0:
            by_id.setdefault(i, []).append((lo, hi))
    return [(q_lo, q_hi, k_lo, k_hi) for i, q_lo, q_hi in runs(q_ids) if i >= 0 for k_lo, k_hi in by_id.get(i, [])]


def _flash_varlen(q, k, v, ids, causal, scale, return_lse):
    """flash_attn_varlen_func over the runs of ids (B = 1); padding runs are computed and zeroed."""
    from flash_attn import flash_attn_varlen_func

    if q.shape[0] != 1:
        raise ValueError(f"attention: backend='flash' with seq_ids takes one packed sequence (batch 1), got batch "
                         f"{q.shape[0]}; flatten the rows into one sequence or use backend='sdpa'")
    segs = runs(ids[0])
    if len({i for i, _, _ in segs}) != len(segs):
        raise ValueError("attention: backend='flash' with seq_ids needs each id in one contiguous run (varlen "
                         "segments); order the tokens by id, or use backend='sdpa'")
    bounds = [lo for _, lo, _ in segs] + [ids.shape[1]]
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    longest = max(hi - lo for _, lo, hi in segs)
    out = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                 longest, longest, dropout_p=0.0, softmax_scale=scale, causal=causal,
                                 return_attn_probs=return_lse)
    o = (out[0] if return_lse else out).transpose(0, 1).unsqueeze(0)
    pad = (ids < 0)[:, None, :, None]
    o = o.masked_fill(pad, 0.0)
    if not return_lse:
        return o
    lse = out[1].float().unsqueeze(0).masked_fill(pad[..., 0], float("-inf"))
    return o, lse


def ring_pieces(all_ids: torch.Tensor, rank: int) -> list[list[tuple]]:
    """Ring tasks from every rank's ids (world, 1 or B, T_local): for each source block, the
    (batch slice, q_lo, q_hi, k_lo, k_hi, causal=False) rectangles this rank's queries attend to."""
    rows = all_ids.shape[1]
    same = rows == 1 or bool((all_ids == all_ids[:, :1]).all())
    batches = [(slice(None), 0)] if same else [(slice(b, b + 1), b) for b in range(rows)]
    return [[(bsl, *piece, False) for bsl, b in batches for piece in segment_pieces(all_ids[rank, b], all_ids[src, b])]
            for src in range(all_ids.shape[0])]
