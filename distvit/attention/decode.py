"""Decode attention: a few new query tokens against a long KV cache.

    o = decode_attention(q, k_cache, v_cache, cache_seqlens, backend="auto")

q is (B, Hq, Tq, D) with Tq <= 16; the caches are (B, Hkv, T, D) with Hq a multiple of Hkv
(GQA, MQA). cache_seqlens (B,) says how many cache positions of each sequence hold keys
(0 allowed: that sequence gets o = 0, lse = -inf).

Causal convention for Tq > 1 (bottom-right aligned, as in the attention API): the cache
already holds the new tokens' keys, and the Tq queries are the last Tq positions of their
sequence, so query t of sequence b sees cache positions 0 .. cache_seqlens[b] - Tq + t. A
query whose position falls before 0 (cache_seqlens[b] < Tq) sees nothing: o = 0, lse = -inf.

Backends (all return the same numbers up to rounding):
- "streamk": Triton kernel, persistent grid, spans crossing head and batch boundaries
  (decode_triton.py). CPU tensors run it under Triton's interpreter, which needs
  TRITON_INTERPRET=1 set before triton is imported (slow; for tests).
- "splitk": the same kernel with a fixed number of splits per head (the Flash-Decoding
  schedule, our baseline).
- "torch": the same chunked math in PyTorch with merge.py: the CPU path.
- "sdpa": torch's scaled_dot_product_attention with a mask: the reference. No lse.
- "auto": streamk on CUDA, torch elsewhere.

Inference only: no backward.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from distvit.attention.merge import merge_partials

BACKENDS = ("auto", "streamk", "splitk", "torch", "sdpa")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_QUERY_TOKENS = 16
MAX_HEAD_DIM = 256
TORCH_CHUNK = 2048  # cache positions per partial on the torch path


def decode_attention(q, k_cache, v_cache, cache_seqlens=None, *, backend="auto", num_programs=None,
                     scale=None, return_lse=False, keys_after=None):
    """Attention of q over the first cache_seqlens[b] positions of each sequence's cache.

    num_programs: grid size of the streamk kernel (default: 2 per SM on CUDA, 8 on CPU) and
        the program budget that splitk spreads over the heads; the torch and sdpa backends
        ignore it.
    scale: softmax scale, default 1/sqrt(D).
    keys_after: (B,) int, keys of each sequence held after this cache (by later
        sequence-parallel ranks); the queries sit after them, which moves the causal bound.
        None means 0. Only matters for Tq > 1.
    Returns o (B, Hq, Tq, D) in q's dtype, and lse (B, Hq, Tq) float32 if return_lse.
    """
    _check_shapes(q, k_cache, v_cache)
    B, T = q.shape[0], k_cache.shape[2]
    lens = _check_lengths(cache_seqlens, "cache_seqlens", B, T, q.device)
    after = _check_lengths(keys_after, "keys_after", B, None, q.device) if keys_after is not None else None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = _resolve_backend(backend, q.device)
    if backend == "sdpa" and return_lse:
        raise ValueError("decode_attention: backend='sdpa' cannot return lse (torch SDPA does not expose it); "
                         "use backend='torch' or 'streamk' with return_lse=True")
    if num_programs is not None and (not isinstance(num_programs, int) or num_programs < 1):
        raise ValueError(f"decode_attention: num_programs={num_programs!r}; it must be a positive int (or None "
                         "for the default)")
    visible = lens if after is None else lens + after

    with torch.no_grad():
        if backend in ("streamk", "splitk"):
            kernels = _kernel_module(q.device)
            n = num_programs or kernels.default_num_programs(q.device)
            o, lse = kernels.decode(q, k_cache, v_cache, lens, visible, scale, backend, n)
        elif backend == "torch":
            o, lse = _decode_torch(q, k_cache, v_cache, lens, visible, scale)
        else:
            masked = cache_seqlens is not None or keys_after is not None or q.shape[2] > 1
            o, lse = _decode_sdpa(q, k_cache, v_cache, lens, visible, scale, masked), None
    return (o, lse) if return_lse else o


# ---------------------------------------------------------------------------------- checks


def _check_shapes(q, k, v):
    for name, t in (("q", q), ("k_cache", k), ("v_cache", v)):
        if not torch.is_tensor(t):
            raise TypeError(f"decode_attention: {name} is a {type(t).__name__}; it must be a torch.Tensor")
        if t.dim() != 4:
            layout = "(batch, q_heads, q_tokens, head_dim)" if name == "q" else "(batch, kv_heads, positions, head_dim)"
            raise ValueError(f"decode_attention: {name} has shape {tuple(t.shape)}; it must be 4-D {layout}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"decode_attention: {name} has dtype {t.dtype}; supported are float32, bfloat16, float16")
    if k.shape != v.shape:
        raise ValueError(f"decode_attention: k_cache has shape {tuple(k.shape)} but v_cache {tuple(v.shape)}; "
                         "they must match")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"decode_attention: dtypes differ (q {q.dtype}, k_cache {k.dtype}, v_cache {v.dtype}); "
                        "cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"decode_attention: devices differ (q {q.device}, k_cache {k.device}, v_cache {v.device}); "
                         "move them to one device")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"decode_attention: q has batch {B} but k_cache {k.shape[0]}; they must match")
    if k.shape[3] != D:
        raise ValueError(f"decode_attention: q has head_dim {D} but k_cache {k.shape[3]}; they must match")
    if not 1 <= Tq <= MAX_QUERY_TOKENS:
        raise ValueError(f"decode_attention: q has {Tq} query tokens (dim 2); decode takes 1..{MAX_QUERY_TOKENS} "
                         "(use the prefill attention for longer chunks)")
    if D % 8 != 0 or not 8 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head_dim {D} (q dim 3) must be a multiple of 8 from 8 to {MAX_HEAD_DIM}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"decode_attention: q has {Hq} heads and k_cache {Hkv}; q heads must be a multiple of kv "
                         "heads (GQA/MQA)")
    if k.shape[2] == 0:
        raise ValueError("decode_attention: k_cache has 0 positions (dim 2); allocate the cache with room for "
                         "the tokens and pass cache_seqlens=0 for empty sequences")


def _check_lengths(lengths, name, batch, capacity, device):
    """(B,) int32 on device. Values are range-checked where that costs no device sync."""
    if lengths is None:
        return torch.full((batch,), capacity, dtype=torch.int32, device=device)
    if not torch.is_tensor(lengths):
        raise TypeError(f"decode_attention: {name} is a {type(lengths).__name__}; pass a (batch,) int tensor")
    if lengths.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"decode_attention: {name} has dtype {lengths.dtype}; it must be an integer tensor")
    if lengths.shape != (batch,):
        raise ValueError(f"decode_attention: {name} has shape {tuple(lengths.shape)}; it must be ({batch},), "
                         "one length per sequence")
    if lengths.device != device:
        raise ValueError(f"decode_attention: {name} is on {lengths.device} but q on {device}; move it to {device}")
    if device.type == "cpu":
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or (capacity is not None and high > capacity):
            bound = f"0..{capacity} (the cache has {capacity} positions)" if capacity is not None else ">= 0"
            raise ValueError(f"decode_attention: {name} has values in {low}..{high}; they must be in {bound}")
        return lengths.to(torch.int32).contiguous()
    # On accelerators a value check would stall the stream: clamp instead (documented).
    upper = capacity if capacity is not None else torch.iinfo(torch.int32).max
    return lengths.clamp(0, upper).to(torch.int32).contiguous()


def _resolve_backend(backend, device):
    if backend not in BACKENDS:
        raise ValueError(f"decode_attention: backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "streamk"
    return "torch"


# ---------------------------------------------------------------------------------- triton

def _kernel_module(device):
    """decode_triton, checked to be runnable on this device.

    Triton decides between compiling and interpreting when a kernel is decorated, from
    TRITON_INTERPRET, and its own library functions (tl.max, tl.sum...) are decorated when
    triton is imported: so CPU tensors need TRITON_INTERPRET=1 set before triton's import.
    """
    if importlib.util.find_spec("triton") is None:
        raise ImportError("decode_attention: backends 'streamk' and 'splitk' need triton (pip install triton, or "
                          "the dev extra); use backend='torch' on machines without it")
    from distvit.attention import decode_triton

    if device.type != "cuda" and not decode_triton.INTERPRETED:
        raise RuntimeError(f"decode_attention: the Triton kernel got {device.type} tensors, which it can run "
                           "only under Triton's interpreter: set TRITON_INTERPRET=1 in the environment before "
                           "triton is imported, move the tensors to CUDA, or use backend='torch'")
    return decode_triton


# ---------------------------------------------------------------------------------- torch


def _last_visible(lens, visible, Tq, G):
    """Last cache position each query row may see: (B, G*Tq), rows ordered (group, token).

    Bottom-right causal (query t is position visible - Tq + t), and never past the keys held.
    """
    tok = torch.arange(Tq, device=lens.device).repeat(G)
    bound = visible.long()[:, None] - Tq + tok[None, :]
    return torch.minimum(bound, lens.long()[:, None] - 1)


def _decode_torch(q, k, v, lens, visible, scale):
    """Context cut in chunks of TORCH_CHUNK positions; per chunk (o, lse); merged exactly."""
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = torch.float32
    qg = q.reshape(B, Hkv, G * Tq, D).to(acc) * scale
    last = _last_visible(lens, visible, Tq, G)[:, None, :, None]  # (B, 1, rows, 1)
    # On CPU skip the chunks past the longest sequence (free to know there); on GPU that
    # would need a sync.
    end = max(int(lens.max()), 1) if q.device.type == "cpu" else T
    outs, lses = [], []
    for start in range(0, end, TORCH_CHUNK):
        stop = min(start + TORCH_CHUNK, end)  # not past `end`: a short sequence in a big cache reads its keys only
        kc = k[:, :, start:stop].to(acc)
        vc = v[:, :, start:stop].to(acc)
        s = qg @ kc.transpose(-1, -2)  # (B, Hkv, rows, C)
        pos = torch.arange(start, stop, device=q.device)
        s = s.masked_fill(pos > last, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        p = torch.exp(s - shift[..., None])  # masked scores give exp(-inf) = 0
        outs.append(p @ vc)
        lses.append(lse)
    o, lse = merge_partials(outs, lses)
    return o.reshape(B, Hq, Tq, D).to(q.dtype), lse.reshape(B, Hq, Tq)


def _decode_sdpa(q, k, v, lens, visible, scale, masked):
    """torch SDPA; masked=False (full caches, Tq = 1) lets it pick its fused kernels."""
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    gqa = {"enable_gqa": True} if Hq != Hkv else {}
    if not masked:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **gqa)
    last = _last_visible(lens, visible, Tq, 1)  # (B, Tq)
    mask = torch.arange(T, device=q.device)[None, None, :] <= last[:, :, None]  # (B, Tq, T)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, **gqa)
    # SDPA gives NaN for rows that see no key; our contract is o = 0 there.
    sees = mask.any(dim=-1)[:, None, :, None]
    return torch.where(sees, o, torch.zeros_like(o))
