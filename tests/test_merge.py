"""Exact (o, lse) merge: chunked attention merged equals attention over all keys.

Reference: softmax attention in float64 over the concatenated keys. Tolerance 1e-12 in
float64 (the merge is exact math, only rounding differs), 1e-5 for float32 partials.
"""
import math

import pytest
import torch

from distvit.attention.merge import merge_partials, merge_two


def _attend(q, k, v):
    """(o, lse) of softmax attention, any dtype; rows with no keys give o = 0, lse = -inf."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, dim=-1)
    if k.shape[-2] == 0:
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype), lse
    return torch.softmax(s, dim=-1) @ v, lse


def _chunks(q, k, v, bounds):
    parts = [_attend(q, k[..., a:b, :], v[..., a:b, :]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [p[0] for p in parts], [p[1] for p in parts]


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 50, 16, generator=g, dtype=torch.float64) * 3  # peaky softmax
    v = torch.randn(2, 3, 50, 16, generator=g, dtype=torch.float64)
    return q, k, v


def test_merge_partials_equals_full_attention(qkv):
    q, k, v = qkv
    o_ref, lse_ref = _attend(q, k, v)
    outs, lses = _chunks(q, k, v, [0, 7, 7, 30, 31, 50])  # includes one empty chunk
    o, lse = merge_partials(outs, lses)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)


def test_merge_two_folded_left_and_right_agree_with_full(qkv):
    q, k, v = qkv
    o_ref, lse_ref = _attend(q, k, v)
    outs, lses = _chunks(q, k, v, [0, 10, 20, 35, 50])
    o, lse = outs[0], lses[0]
    for o_i, lse_i in zip(outs[1:], lses[1:]):
        o, lse = merge_two(o, lse, o_i, lse_i)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)
    # The other association order: ((3 2) 1) 0.
    o, lse = outs[-1], lses[-1]
    for o_i, lse_i in zip(outs[-2::-1], lses[-2::-1]):
        o, lse = merge_two(o_i, lse_i, o, lse)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)


def test_empty_partials_give_zero_and_minus_inf_not_nan():
    o = torch.randn(3, 2, 8)
    lse = torch.full((3, 2), float("-inf"))
    merged_o, merged_lse = merge_partials(o, lse)  # stacked on dim 0: all three empty
    assert torch.equal(merged_o, torch.zeros(2, 8))
    assert torch.isneginf(merged_lse).all()
    two_o, two_lse = merge_two(o[0], lse[0], o[1], lse[1])
    assert torch.equal(two_o, torch.zeros(2, 8))
    assert torch.isneginf(two_lse).all()


def test_empty_partial_leaves_the_other_unchanged():
    o_a, lse_a = torch.randn(4, 8), torch.randn(4)
    o_b, lse_b = torch.randn(4, 8), torch.full((4,), float("-inf"))
    o, lse = merge_two(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o, o_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, lse_a, rtol=0, atol=0)


def test_merge_keeps_output_dtype_and_accumulates_in_float32():
    # bf16 outputs with fp32 lse: the result is bf16, the lse stays float32, and the weights
    # are applied in float32 (only the final cast rounds): compare with a float64 merge.
    g = torch.Generator().manual_seed(1)
    outs = torch.randn(5, 6, 32, generator=g).to(torch.bfloat16)
    lses = torch.randn(5, 6, generator=g) * 4
    o, lse = merge_partials(outs, lses)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    o64, lse64 = merge_partials(outs.double(), lses.double())
    torch.testing.assert_close(o.double(), o64, rtol=1e-2, atol=1e-2)  # one bf16 rounding
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-6, atol=1e-6)


def test_merge_partials_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as err:
        merge_partials(torch.zeros(2, 3, 8), torch.zeros(2, 4))
    assert str(err.value) == (
        "merge_partials: outs have shape (2, 3, 8) but lses (2, 4); lse must have the outputs' shape "
        "without the last (head_dim) dimension"
    )
