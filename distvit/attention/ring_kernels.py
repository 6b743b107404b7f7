"""The per-piece kernels of ring attention (sequence_parallel.py): (o, lse) of one (query rows x key
block) piece, and its gradient given the final o and lse of the rows."""
from __future__ import annotations

import torch

from distvit.attention.backends import attention, causal_visible

# Score elements (batch * heads * rows * keys) per chunk in the ring backward: bounds its memory.
BACKWARD_BLOCK_ELEMENTS = 1 << 24


def _fused_cpu_pair(q: torch.Tensor, backend: str):
    """aten's flash-attention-for-cpu kernels (forward with lse; backward from a given o and lse), or None.

    The ring needs both halves of a flash kernel: (o, lse) of a piece, and the gradient of a
    piece given the FINAL o and lse of its rows. The attention API returns lse (on the CPU by
    blockwise math) but exposes no such backward; PyTorch ships the fused pair for the CPU, 2-3x
    faster than math at these sizes. Used where the attention API would pick SDPA on the CPU.
    """
    aten = torch.ops.aten
    if q.device.type != "cpu" or backend not in ("auto", "sdpa") or not hasattr(
            aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return None
    return aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward


def _piece_forward(q, k, v, causal, scale, backend):
    """(o, lse) of queries q against keys k (causal pieces are square: top-left = bottom-right)."""
    fused = _fused_cpu_pair(q, backend)
    if fused is not None:
        return fused[0](q, k, v, 0.0, causal, scale=scale)
    return attention(q, k, v, causal=causal, scale=scale, backend=backend, return_lse=True)


def _piece_backward(q, k, v, o, do, lse, delta, causal, scale, backend):
    """dq, dk, dv of one piece given the final o, lse (and delta = rowsum(dO * O)) of its rows."""
    fused = _fused_cpu_pair(q, backend)
    if fused is not None:
        dq, dk, dv = fused[1](do.contiguous(), q, k, v, o.contiguous(), lse.contiguous(), 0.0, causal, scale=scale)
        acc = torch.promote_types(q.dtype, torch.float32)
        return dq.to(acc), dk.to(acc), dv.to(acc)
    return _block_grads(q, k, v, o, do, lse, delta, causal, scale)


def _block_grads(q, k, v, o, do, lse, delta, causal, scale):
    """dq, dk, dv of one (query rows, key block) piece given the final o, lse of the rows.

    With P = exp(S - lse) (the final softmax restricted to this block) and delta = rowsum(dO * O):
    dS = P * (dO V^T - delta), dQ = dS K * scale, dK = dS^T Q * scale, dV = P^T dO. Rows are
    processed in chunks so the score matrix stays below BACKWARD_BLOCK_ELEMENTS.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    kf, vf = k.to(acc), v.to(acc)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    rows = max(1, min(tq, BACKWARD_BLOCK_ELEMENTS // max(1, b * h * tk)))
    for r0 in range(0, tq, rows):
        sl = slice(r0, r0 + rows)
        q_r, do_r = q[:, :, sl].to(acc), do[:, :, sl].to(acc)
        s = torch.matmul(q_r, kf.transpose(-2, -1)) * scale
        lse_r = lse[:, :, sl].unsqueeze(-1)
        p = torch.exp(s - torch.where(torch.isfinite(lse_r), lse_r, torch.zeros_like(lse_r)))
        if causal:
            p = p.masked_fill(~causal_visible(r0, q_r.shape[2], tq, tk, q.device), 0.0)
        ds = p * (torch.matmul(do_r, vf.transpose(-2, -1)) - delta[:, :, sl].unsqueeze(-1))
        dq[:, :, sl] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-2, -1), q_r) * scale
        dv += torch.matmul(p.transpose(-2, -1), do_r)
    return dq, dk, dv
