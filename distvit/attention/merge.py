"""Exact merge of partial attention results.

Attention over a key set split into chunks can be computed chunk by chunk: each chunk i gives
its normalised output o_i and its log-sum-exp lse_i (log of the softmax denominator over that
chunk's keys). The result over all keys is the lse-weighted mean of the o_i, with
lse = logsumexp_i(lse_i). Decode (stream-K spans), ring attention (one chunk per ring step) and
the cross-rank decode merge all reduce with this one rule.

An empty chunk (no keys, or every key masked) has lse = -inf and contributes nothing; a row
where every chunk is empty gets o = 0 and lse = -inf rather than NaN.
"""
from __future__ import annotations

from typing import Sequence

import torch


def merge_two(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two partials. o: (..., tokens, head_dim); lse: (..., tokens), float32 or wider.

    Returns (o, lse) with o in o_a's dtype and lse in lse_a's dtype.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # Where both are -inf, logaddexp is -inf and the weights below would be NaN: use 0 there.
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse)).unsqueeze(-1)
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse)).unsqueeze(-1)
    o = o_a.to(w_a.dtype) * w_a + o_b.to(w_b.dtype) * w_b
    return o.to(o_a.dtype), lse


def merge_partials(outs: Sequence[torch.Tensor] | torch.Tensor, lses: Sequence[torch.Tensor] | torch.Tensor):
    """Merge any number of partials at once.

    outs: a sequence of (..., tokens, head_dim) tensors, or one tensor stacked on dim 0.
    lses: the matching (..., tokens) tensors, or one tensor stacked on dim 0.
    Returns (o, lse) in the dtype of the first partial (o) and of the lse inputs (lse).
    """
    o_all = torch.stack(list(outs)) if not torch.is_tensor(outs) else outs
    lse_all = torch.stack(list(lses)) if not torch.is_tensor(lses) else lses
    if o_all.shape[:-1] != lse_all.shape:
        raise ValueError(
            f"merge_partials: outs have shape {tuple(o_all.shape)} but lses {tuple(lse_all.shape)}; "
            "lse must have the outputs' shape without the last (head_dim) dimension"
        )
    acc = torch.promote_types(lse_all.dtype, torch.float32)
    lse_all = lse_all.to(acc)
    lse = torch.logsumexp(lse_all, dim=0)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w = torch.where(finite.unsqueeze(0), torch.exp(lse_all - safe.unsqueeze(0)), torch.zeros_like(lse_all))
    o = (o_all.to(acc) * w.unsqueeze(-1)).sum(dim=0)
    return o.to(o_all.dtype), lse
