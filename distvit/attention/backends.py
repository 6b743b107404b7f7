"""One attention call for every model: softmax(q k^T * scale + bias) v.

    o = attention(q, k, v, causal=False, bias=None, scale=None, backend="auto")
    o, lse = attention(q, k, v, return_lse=True)

Layout as torch SDPA: q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv), o (B, H, Tq, Dv).
k and v may hold fewer or more tokens than q.

causal: with Tq != Tk the mask is aligned bottom-right (as flash-attn >= 2.1 and the KV-cache
    convention): query i attends key j when j <= i + (Tk - Tq). The last query sees every key;
    with Tq > Tk the first Tq - Tk queries see none.
bias: an additive float bias broadcastable to (B, H, Tq, Tk) (Swin's relative position bias
    plus its shift mask); -inf entries hide a key. It gets a gradient when it requires one.
scale: softmax scale, default 1/sqrt(D).
seq_ids: packed sequences (block-diagonal attention). An integer tensor (Tq,) or (B, Tq) giving
    each token's segment (image) id; query i sees key j only when their ids are equal and >= 0.
    Id -1 marks padding: never a visible key; a padding query gets o = 0 (lse = -inf).
    kv_seq_ids gives the keys' ids when the keys are other tokens than the queries (ring
    attention's blocks); it defaults to seq_ids (then Tq must equal Tk). The math backend
    masks the scores; sdpa passes a boolean block mask; flash runs flash_attn_varlen_func on
    the segments (B = 1, each segment one contiguous run of ids, q and k the same tokens).
return_lse: also return lse (B, H, Tq), the natural log of the softmax denominator
    (log sum_j exp(s_ij), s including scale and bias), float32 (float64 for float64 inputs).
    Ring attention and the decode merge combine partial results with it (merge.py). A row
    with no visible key has lse = -inf and o = 0 (not NaN), so merging it adds nothing.

Backends:
- "math": the reference, plain torch ops, any dtype including float64, every option.
- "sdpa": torch.nn.functional.scaled_dot_product_attention. SDPA does not return lse, so
  with return_lse the call runs blockwise math instead (forward and a recomputing backward,
  memory O(block x Tk), gradient exact through both o and lse).
- "flash": flash_attn.flash_attn_func, CUDA with float16/bfloat16, no bias.
- "auto": flash when the call can run there (CUDA, fp16/bf16, no bias, flash-attn
  installed), else sdpa.
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

from distvit.choices import ATTENTION_BACKENDS  # model.attn_backend is typed with it

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
FLASH_INSTALL_HINT = "pip install 'distvit[flash]'"
# Score elements (B*H*rows*Tk) per block on the blockwise lse path: bounds its extra memory.
LSE_BLOCK_ELEMENTS = 1 << 24


def list_backends() -> list[str]:
    """The backend names that can run on this machine ("flash" only when flash-attn imports and CUDA is up)."""
    return [name for name in ATTENTION_BACKENDS if name != "flash" or flash_available()]


def flash_available() -> bool:
    return torch.cuda.is_available() and flash_installed()


@functools.lru_cache(maxsize=None)
def flash_installed() -> bool:
    # Cached: find_spec walks sys.path, ~3 ms per attention call on the CPU benchmark (every layer, every step).
    return importlib.util.find_spec("flash_attn") is not None


def attention(q, k, v, *, causal: bool = False, bias: torch.Tensor | None = None, scale: float | None = None,
              backend: str = "auto", return_lse: bool = False, seq_ids: torch.Tensor | None = None,
              kv_seq_ids: torch.Tensor | None = None):
    """softmax(q k^T * scale + bias [causal mask] [block mask]) v; see the module docstring for the contract."""
    _check_inputs(q, k, v, bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if seq_ids is not None or kv_seq_ids is not None:
        from distvit.attention.packed import packed_attention

        return packed_attention(q, k, v, seq_ids, kv_seq_ids, causal=causal, bias=bias, scale=scale,
                                backend=backend, return_lse=return_lse)
    backend = resolve_backend(backend, q, k, v, bias)
    if backend == "math":
        o, lse = _math(q, k, v, causal, bias, scale)
        return (o, lse) if return_lse else o
    if backend == "flash":
        if not return_lse:
            return _flash(q, k, v, causal, scale)[0]
        return _AttentionWithLse.apply(q, k, v, bias, causal, scale, "flash")
    if return_lse:
        return _AttentionWithLse.apply(q, k, v, bias, causal, scale, "blockwise")
    return _sdpa(q, k, v, causal, bias, scale)


def resolve_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor | None = None) -> str:
    """The concrete backend ("math", "sdpa" or "flash") a call with these inputs runs on."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: unknown backend={backend!r}; valid backends: {', '.join(ATTENTION_BACKENDS)}")
    if backend == "auto":
        return "flash" if flash_installed() and _flash_unsupported(q, k, v, bias) is None else "sdpa"
    if backend == "flash":
        if not flash_installed():
            raise ImportError(f"attention: backend='flash' needs the flash-attn package, which is not installed; "
                              f"install it with {FLASH_INSTALL_HINT} (CUDA only), or use backend='sdpa'")
        why = _flash_unsupported(q, k, v, bias)
        if why is not None:
            raise ValueError(f"attention: backend='flash' cannot run this call: {why}")
    return backend


def causal_visible(q_start: int, q_rows: int, tq: int, tk: int, device=None) -> torch.Tensor:
    """Bool (q_rows, tk): which keys queries q_start .. q_start+q_rows-1 of tq see (bottom-right aligned)."""
    i = torch.arange(q_start, q_start + q_rows, device=device).unsqueeze(1)
    j = torch.arange(tk, device=device).unsqueeze(0)
    return j <= i + (tk - tq)


# --- validation -----------------------------------------------------------------------------


def _check_inputs(q, k, v, bias):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} has shape {tuple(t.shape)}; it must be 4-D "
                             "(batch, heads, tokens, head_dim), as torch SDPA takes it")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} has dtype {t.dtype}; it must be a floating-point tensor")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; they must match")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on {q.device}, {k.device}, {v.device}; they must share a device")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"attention: (batch, heads) of q {tuple(q.shape[:2])}, k {tuple(k.shape[:2])}, "
                         f"v {tuple(v.shape[:2])} must be equal")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: k has head_dim {k.shape[3]} but q has {q.shape[3]}; q and k must share head_dim")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: v has {v.shape[2]} tokens but k has {k.shape[2]}; k and v must hold the same tokens")
    if bias is not None:
        if not torch.is_tensor(bias) or not bias.is_floating_point():
            got = bias.dtype if torch.is_tensor(bias) else type(bias).__name__
            raise TypeError(f"attention: bias has dtype {got}; it must be an additive float bias (turn a boolean "
                            "keep-mask into one with torch.zeros(shape).masked_fill(~mask, float('-inf')))")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        padded = (1,) * (4 - bias.dim()) + tuple(bias.shape)
        if bias.dim() > 4 or any(b not in (1, t) for b, t in zip(padded, target)):
            raise ValueError(f"attention: bias has shape {tuple(bias.shape)}, which does not broadcast to "
                             f"(batch, heads, q_tokens, k_tokens) = {target}")
        if bias.device != q.device:
            raise ValueError(f"attention: bias is on {bias.device} but q on {q.device}; they must share a device")


def _flash_unsupported(q, k, v, bias) -> str | None:
    """Why flash-attn (installed) cannot run this call, or None when it can."""
    if bias is not None:
        return "flash-attn takes no additive bias; use backend='sdpa' or 'math' for a bias"
    if q.dtype not in FLASH_DTYPES:
        return f"dtype {q.dtype}; flash-attn takes float16 or bfloat16 (cast, or use backend='sdpa')"
    if q.shape[-1] > FLASH_MAX_HEAD_DIM or v.shape[-1] != q.shape[-1]:
        return (f"head_dim q={q.shape[-1]}, v={v.shape[-1]}; flash-attn needs equal head dims "
                f"<= {FLASH_MAX_HEAD_DIM} (use backend='sdpa')")
    if q.device.type != "cuda":
        return f"the inputs are on {q.device}; flash-attn runs on CUDA only (use backend='sdpa')"
    return None


# --- the backends ---------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q, k, bias, causal, scale, q_start, tq):
    """Masked scores s (B, H, rows, Tk) in the accumulation dtype for query rows q_start.. of tq."""
    acc = _acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    if bias is not None:
        # Rows of the bias for these queries (a bias of < 2 dims or with size 1 there broadcasts).
        rows = bias if bias.dim() < 2 or bias.shape[-2] == 1 else bias[..., q_start:q_start + q.shape[2], :]
        s = s + rows.to(acc)
    if causal:
        s = s.masked_fill(~causal_visible(q_start, q.shape[2], tq, k.shape[2], q.device), float("-inf"))
    return s


def _softmax_stats(s):
    """(p, l, lse) with p = exp(s - m) unnormalised, l = sum p; rows with no finite score give p = 0, lse = -inf.

    The row max m is detached: softmax and lse are exactly shift-invariant, so the gradient is
    unchanged, and a -inf row never reaches exp(-inf - -inf) = NaN.
    """
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m + torch.log(l_safe))
    return p, l_safe, lse.squeeze(-1)


def _math(q, k, v, causal, bias, scale, q_start=0, tq=None):
    """Explicit reference, differentiable: returns (o in q's dtype, lse in the accumulation dtype)."""
    tq = q.shape[2] if tq is None else tq
    s = _scores(q, k, bias, causal, scale, q_start, tq)
    p, l, lse = _softmax_stats(s)
    o = torch.matmul(p, v.to(p.dtype)) / l
    return o.to(q.dtype), lse


def _sdpa(q, k, v, causal, bias, scale):
    tq, tk = q.shape[2], k.shape[2]
    mask = None
    if bias is not None:
        mask = bias.to(q.dtype)
    if causal and (tq != tk or mask is not None):
        # SDPA's is_causal is top-left aligned; build the bottom-right mask explicitly.
        visible = causal_visible(0, tq, tq, tk, q.device)
        hide = torch.zeros(tq, tk, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
        mask = hide if mask is None else mask + hide
        causal = False
    if mask is not None and mask.dim() not in (2, 4):
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _flash(q, k, v, causal, scale):
    """flash-attn in its (B, T, H, D) layout; returns (o, lse or None) in our layout."""
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0,
                          softmax_scale=scale, causal=causal, return_attn_probs=True)
    o, lse = out[0], out[1]
    # flash-attn marks a row with no visible key with lse = +inf; our contract is -inf.
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
    return o.transpose(1, 2), lse.float()


def _row_blocks(q, k):
    b, h, tq, _ = q.shape
    rows = max(1, min(tq, LSE_BLOCK_ELEMENTS // max(1, b * h * k.shape[2])))
    return range(0, tq, rows), rows


def _blockwise_forward(q, k, v, bias, causal, scale):
    """(o, lse) without autograd, query rows in blocks so the scores never exceed LSE_BLOCK_ELEMENTS."""
    starts, rows = _row_blocks(q, k)
    tq = q.shape[2]
    o = q.new_empty(q.shape[:3] + (v.shape[3],))
    lse = torch.empty(q.shape[:3], dtype=_acc_dtype(q.dtype), device=q.device)
    with torch.no_grad():
        for r0 in starts:
            o_r, lse_r = _math(q[:, :, r0:r0 + rows], k, v, causal, bias, scale, q_start=r0, tq=tq)
            o[:, :, r0:r0 + rows] = o_r
            lse[:, :, r0:r0 + rows] = lse_r
    return o, lse


class _AttentionWithLse(torch.autograd.Function):
    """(o, lse) from a fused or blockwise forward; backward recomputes the scores block by block.

    With P = exp(S - lse): dS = P * (dO V^T - rowsum(dO * O) + dlse), so a gradient arriving
    through lse (as ring attention's merge sends one) is exact, not dropped.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, causal, scale, kernel):
        if kernel == "flash":
            o, lse = _flash(q, k, v, causal, scale)
        else:
            o, lse = _blockwise_forward(q, k, v, bias, causal, scale)
        ctx.save_for_backward(q, k, v, bias, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, bias, o, lse = ctx.saved_tensors
        causal, scale = ctx.causal, ctx.scale
        acc = _acc_dtype(q.dtype)
        tq = q.shape[2]
        kf, vf = k.to(acc), v.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        need_bias = bias is not None and ctx.needs_input_grad[3]
        dbias = torch.zeros(bias.shape, dtype=acc, device=q.device) if need_bias else None
        starts, rows = _row_blocks(q, k)
        for r0 in starts:
            sl = slice(r0, r0 + rows)
            q_r = q[:, :, sl]
            s = _scores(q_r, k, bias, causal, scale, r0, tq)
            lse_r = lse[:, :, sl].to(acc).unsqueeze(-1)
            p = torch.exp(s - torch.where(torch.isfinite(lse_r), lse_r, torch.zeros_like(lse_r)))
            do_r = (do[:, :, sl] if do is not None else torch.zeros_like(o[:, :, sl])).to(acc)
            d_row = (do_r * o[:, :, sl].to(acc)).sum(-1, keepdim=True)
            ds = torch.matmul(do_r, vf.transpose(-2, -1)) - d_row
            if dlse is not None:
                ds = ds + dlse[:, :, sl].to(acc).unsqueeze(-1)
            ds = p * ds
            dq[:, :, sl] = torch.matmul(ds, kf) * scale
            dk += torch.matmul(ds.transpose(-2, -1), q_r.to(acc)) * scale
            dv += torch.matmul(p.transpose(-2, -1), do_r)
            if need_bias:
                _accumulate_bias_grad(dbias, ds, sl)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                dbias.to(bias.dtype) if need_bias else None, None, None, None)


def _accumulate_bias_grad(dbias, ds, rows: slice):
    """Add ds (B, H, rows, Tk) into dbias, summing over the dims bias broadcast along."""
    shape = (1,) * (4 - dbias.dim()) + tuple(dbias.shape)
    dims = [d for d in range(4) if shape[d] == 1]
    summed = ds.sum(dim=dims, keepdim=True) if dims else ds  # sum(dim=[]) would sum everything
    view = dbias.view(shape)
    if shape[2] == 1:
        view += summed
    else:
        view[:, :, rows] += summed
