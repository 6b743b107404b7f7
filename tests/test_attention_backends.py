"""The attention API: every backend against the float64 reference, forward, backward and lse.

Tolerances: float64 comparisons use atol 1e-10 (the backends differ only in summation order,
~1e-15 relative; 1e-10 leaves room for exp/log of scores around 10). Half-precision runs are
compared to float64 at atol 2e-2 (bfloat16 has 8 bits of mantissa: ~4e-3 per rounding).
"""
from __future__ import annotations

import math

import pytest
import torch

from distvit.attention import ATTENTION_BACKENDS, attention, list_backends
from distvit.attention import backends as ab

F64_ATOL = 1e-10
SHAPES = [(6, 6), (4, 9), (9, 4)]  # (Tq, Tk): equal, fewer queries (KV cache), more queries


def make_qkv(tq, tk, *, b=2, h=3, d=8, dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(b, h, tk, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(b, h, tk, dv or d, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def make_bias(shape, *, seed=1, dtype=torch.float64, hide_row=None):
    """A learnable bias; hide_row hides every key from that query row (-inf), as a Swin shift mask can."""
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if hide_row is not None:
        bias[..., hide_row, :] = float("-inf")
    return bias.requires_grad_()


def naive(q, k, v, *, causal=False, bias=None, scale=None):
    """Independent reference: softmax over an explicitly built mask, lse by torch.logsumexp."""
    tq, tk = q.shape[2], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias
    if causal:
        keep = torch.tensor([[j <= i + (tk - tq) for j in range(tk)] for i in range(tq)])
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def weighted_loss(o, lse=None):
    """A loss that weighs every output element differently (a plain sum hides some gradient errors)."""
    w = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)
    loss = (o * w).sum()
    if lse is not None:
        finite = torch.isfinite(lse)
        loss = loss + torch.where(finite, lse, torch.zeros_like(lse)).cos().sum()
    return loss


def grads(fn, inputs):
    out = fn()
    o, lse = out if isinstance(out, tuple) else (out, None)
    return o, lse, torch.autograd.grad(weighted_loss(o, lse), inputs)


@pytest.mark.parametrize("tq,tk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_math_matches_naive_softmax(tq, tk, causal):
    q, k, v = make_qkv(tq, tk)
    bias = make_bias((1, 3, tq, tk))
    o, lse = attention(q, k, v, causal=causal, bias=bias, scale=0.4, backend="math", return_lse=True)
    o_ref, lse_ref = naive(q, k, v, causal=causal, bias=bias, scale=0.4)
    seen = torch.isfinite(lse_ref)  # rows with at least one visible key (naive gives NaN elsewhere)
    torch.testing.assert_close(o[seen], o_ref[seen], atol=F64_ATOL, rtol=0)
    torch.testing.assert_close(lse[seen], lse_ref[seen], atol=F64_ATOL, rtol=0)
    assert torch.equal(torch.isfinite(lse), seen)
    assert lse.dtype == torch.float64


@pytest.mark.parametrize("tq,tk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("return_lse", [False, True])
def test_sdpa_matches_math_float64_forward_backward(tq, tk, causal, with_bias, return_lse):
    q, k, v = make_qkv(tq, tk)
    bias = make_bias((3, tq, tk)) if with_bias else None
    inputs = [q, k, v] + ([bias] if with_bias else [])
    call = dict(causal=causal, bias=bias, return_lse=return_lse)
    o_ref, lse_ref, g_ref = grads(lambda: attention(q, k, v, backend="math", **call), inputs)
    o, lse, g = grads(lambda: attention(q, k, v, backend="sdpa", **call), inputs)
    torch.testing.assert_close(o, o_ref, atol=F64_ATOL, rtol=0)
    if return_lse:
        torch.testing.assert_close(lse, lse_ref, atol=F64_ATOL, rtol=0)
    for name, a, b in zip("qkvb", g, g_ref):
        torch.testing.assert_close(a, b, atol=F64_ATOL, rtol=0, msg=lambda m: f"grad of {name}: {m}")


def test_lse_path_passes_gradcheck():
    """Finite differences check the custom backward, including the gradient that flows in through lse."""
    q, k, v = make_qkv(3, 5, b=1, h=2, d=4)
    bias = make_bias((2, 3, 5))

    def fn(q, k, v, bias):
        o, lse = attention(q, k, v, causal=True, bias=bias, backend="sdpa", return_lse=True)
        return o, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-7)


def test_blockwise_lse_path_with_many_blocks(monkeypatch):
    """Blocks of one query row: the bias gradient is accumulated block by block (bias rows and a broadcast bias)."""
    monkeypatch.setattr(ab, "LSE_BLOCK_ELEMENTS", 1)
    q, k, v = make_qkv(7, 5)
    for shape in [(2, 3, 7, 5), (3, 1, 5)]:  # one row per query; one row broadcast over queries
        bias = make_bias(shape)
        inputs = [q, k, v, bias]
        call = dict(causal=True, bias=bias, return_lse=True)
        o_ref, lse_ref, g_ref = grads(lambda: attention(q, k, v, backend="math", **call), inputs)
        o, lse, g = grads(lambda: attention(q, k, v, backend="sdpa", **call), inputs)
        torch.testing.assert_close(o, o_ref, atol=F64_ATOL, rtol=0)
        torch.testing.assert_close(lse, lse_ref, atol=F64_ATOL, rtol=0)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=F64_ATOL, rtol=0)


def test_value_head_dim_may_differ():
    q, k, v = make_qkv(4, 6, d=8, dv=5)
    o_ref, lse_ref = naive(q, k, v)
    for backend in ("math", "sdpa"):
        o, lse = attention(q, k, v, backend=backend, return_lse=True)
        assert o.shape == (2, 3, 4, 5)
        torch.testing.assert_close(o, o_ref, atol=F64_ATOL, rtol=0)
        torch.testing.assert_close(lse, lse_ref, atol=F64_ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_rows_without_visible_keys_give_zero_not_nan(backend, return_lse):
    # Causal with 7 queries over 4 keys: queries 0..2 see no key. The bias hides every key from row 5.
    q, k, v = make_qkv(7, 4)
    bias = make_bias((1, 1, 7, 4), hide_row=5)
    o, lse, g = grads(lambda: attention(q, k, v, causal=True, bias=bias, backend=backend, return_lse=return_lse),
                      [q, k, v, bias])
    empty = torch.tensor([True, True, True, False, False, True, False])
    assert torch.equal(o[:, :, empty], torch.zeros_like(o[:, :, empty]))
    assert torch.isfinite(o).all()
    if return_lse:
        assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, ~empty]).all()
    for t in g:
        assert torch.isfinite(t).all()
    assert torch.equal(g[0][:, :, empty], torch.zeros_like(g[0][:, :, empty]))  # no key: no gradient to q


def test_lse_dtype_and_half_precision():
    q, k, v = make_qkv(5, 7, dtype=torch.float64)
    o_ref, lse_ref = attention(q, k, v, causal=True, backend="math", return_lse=True)
    for dtype in (torch.float32, torch.bfloat16):
        q2, k2, v2 = (t.detach().to(dtype) for t in (q, k, v))
        for backend in ("math", "sdpa"):
            o, lse = attention(q2, k2, v2, causal=True, backend=backend, return_lse=True)
            assert o.dtype == dtype and lse.dtype == torch.float32
            atol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(o.double(), o_ref.detach(), atol=atol, rtol=0)
            torch.testing.assert_close(lse.double(), lse_ref.detach(), atol=atol, rtol=0)
        o = attention(q2, k2, v2, causal=True, backend="sdpa")
        torch.testing.assert_close(o.double(), o_ref.detach(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(4, 4, d=16)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), attention(q, k, v, scale=0.25, backend="math"),
                               atol=F64_ATOL, rtol=0)


def test_backend_names():
    assert ATTENTION_BACKENDS == ("auto", "sdpa", "flash", "math")
    expected = ["auto", "sdpa", "flash", "math"] if ab.flash_available() else ["auto", "sdpa", "math"]
    assert list_backends() == expected
    q, k, v = make_qkv(4, 4, dtype=torch.float32)
    if not torch.cuda.is_available():
        assert ab.resolve_backend("auto", q, k, v) == "sdpa"


def test_unknown_backend_lists_valid_ones():
    q, k, v = make_qkv(4, 4)
    with pytest.raises(ValueError, match=r"^attention: unknown backend='fast'; valid backends: auto, sdpa, flash, math$"):
        attention(q, k, v, backend="fast")


@pytest.mark.skipif(ab.flash_installed(), reason="flash-attn is installed here")
def test_flash_missing_names_the_extra():
    q, k, v = make_qkv(4, 4, dtype=torch.float16)
    with pytest.raises(ImportError, match=r"pip install 'distvit\[flash\]'"):
        attention(q, k, v, backend="flash")


@pytest.mark.parametrize("dtype,bias,message", [
    (torch.float16, True, "flash-attn takes no additive bias; use backend='sdpa' or 'math' for a bias"),
    (torch.float32, False, "dtype torch.float32; flash-attn takes float16 or bfloat16"),
    (torch.float16, False, "the inputs are on cpu; flash-attn runs on CUDA only"),
])
def test_flash_refusals_explain_why(monkeypatch, dtype, bias, message):
    monkeypatch.setattr(ab, "flash_installed", lambda: True)  # reach the checks that follow the install check
    q, k, v = make_qkv(4, 4, dtype=dtype)
    b = torch.zeros(4, 4, dtype=dtype) if bias else None
    with pytest.raises(ValueError, match="^attention: backend='flash' cannot run this call: " + message):
        attention(q, k, v, bias=b, backend="flash")
    assert ab.resolve_backend("auto", q, k, v, b) == "sdpa"  # auto falls back instead of failing


@pytest.mark.parametrize("make,message", [
    (lambda q, k, v: (q[0], k, v, None), r"q has shape \(3, 4, 8\); it must be 4-D \(batch, heads, tokens, head_dim\)"),
    (lambda q, k, v: (q, k, v[:, :, :3], None), "v has 3 tokens but k has 5; k and v must hold the same tokens"),
    (lambda q, k, v: (q, k[..., :4], v, None), "k has head_dim 4 but q has 8; q and k must share head_dim"),
    (lambda q, k, v: (q, k[:, :2], v[:, :2], None), r"\(batch, heads\) of q \(2, 3\), k \(2, 2\), v \(2, 2\) must be equal"),
    (lambda q, k, v: (q, k.float(), v, None), "q, k, v have dtypes torch.float64, torch.float32, torch.float64; they must match"),
    (lambda q, k, v: (q, k, v, torch.zeros(4, 4, dtype=torch.float64)),
     r"bias has shape \(4, 4\), which does not broadcast to \(batch, heads, q_tokens, k_tokens\) = \(2, 3, 4, 5\)"),
    (lambda q, k, v: (q, k, v, torch.ones(4, 5, dtype=torch.bool)), "bias has dtype torch.bool; it must be an additive float bias"),
    (lambda q, k, v: (q.long(), k, v, None), "q has dtype torch.int64; it must be a floating-point tensor"),
])
def test_shape_and_type_errors_name_the_tensor_and_rule(make, message):
    q, k, v = make_qkv(4, 5)
    q, k, v, bias = make(q.detach(), k.detach(), v.detach())
    with pytest.raises((ValueError, TypeError), match="^attention: " + message):
        attention(q, k, v, bias=bias, backend="math")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("tq,tk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backends_match_math(backend, tq, tk, causal):
    if backend == "flash" and not ab.flash_installed():
        pytest.skip("flash-attn is not installed")
    q, k, v = (t.detach().cuda() for t in make_qkv(tq * 16, tk * 16, d=64, dtype=torch.float64))
    o_ref, lse_ref = attention(q, k, v, causal=causal, backend="math", return_lse=True)
    q16, k16, v16 = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    o, lse = attention(q16, k16, v16, causal=causal, backend=backend, return_lse=True)
    seen = torch.isfinite(lse_ref)
    torch.testing.assert_close(o.double(), o_ref, atol=2e-2, rtol=0)
    torch.testing.assert_close(lse.double()[seen], lse_ref[seen], atol=2e-2, rtol=0)
    assert torch.equal(torch.isfinite(lse), seen)
