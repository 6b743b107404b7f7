"""decode_attention against a float64 reference, for every backend.

Tolerances (issue #6): 1e-5 for float32 (the kernels accumulate in float32, ~1e-7 relative
rounding over a few thousand keys stays far below), 2e-2 for bfloat16/float16 (the inputs are
already rounded, so the reference sees the same values; what remains is the 16-bit rounding
of the probabilities fed to P @ V and of the output, 2^-8 relative).

The Triton kernel runs on CPU only under Triton's interpreter, which must be switched on
before triton is imported. Tests named test_interp_* run when TRITON_INTERPRET=1;
test_triton_cases_in_subprocess runs them in a fresh interpreter process from a normal
pytest run, so the rest of the suite keeps the normal triton.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from distvit.attention.decode import decode_attention

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def reference(q, k, v, lens, keys_after=None, scale=None):
    """Dense float64 attention with the documented mask: query t of sequence b sees cache
    positions <= lens[b] + keys_after[b] - Tq + t, and only positions < lens[b]."""
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    vv = v.double().repeat_interleave(Hq // Hkv, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    lens = lens.long()
    visible = lens if keys_after is None else lens + keys_after.long()
    last = torch.minimum(visible[:, None] - Tq + torch.arange(Tq)[None, :], lens[:, None] - 1)
    mask = torch.arange(T)[None, None, :] <= last[:, :, None]  # (B, Tq, T)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return p @ vv, lse


def make_inputs(B, Hq, Hkv, Tq, D, T, lens, dtype, seed=0, layout="bhtd"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    if layout == "bthd":  # a cache stored (B, T, H, D), viewed as (B, H, T, D): non-contiguous
        k = torch.randn(B, T, Hkv, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, T, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    return q, k, v, torch.tensor(lens, dtype=torch.int32)


def assert_matches(o, lse, q, k, v, lens, dtype, keys_after=None):
    ref_o, ref_lse = reference(q, k, v, lens, keys_after)
    tol = TOL[dtype]
    assert o.dtype == dtype and o.shape == q.shape
    torch.testing.assert_close(o.double(), ref_o, rtol=tol, atol=tol)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        # -inf where a row sees no key, in both; assert_close treats equal infinities as equal.
        torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


def lengths_for(B, T):
    """B = 1: a full cache. B = 3: full, empty, and a single key (the issue's 0 and 1)."""
    return [T] if B == 1 else [T, 0, 1]


# ------------------------------------------------------------------ torch path: the full grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 17, 1000, 4129])
@pytest.mark.parametrize("D", [64, 128, 72])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("Tq", [1, 4])
def test_torch_backend_grid(Tq, B, heads, D, T, dtype):
    q, k, v, lens = make_inputs(B, *heads, Tq, D, T, lengths_for(B, T), dtype)
    o, lse = decode_attention(q, k, v, lens, backend="torch", return_lse=True)
    assert_matches(o, lse, q, k, v, lens, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,heads,Tq,D,T", [(3, (8, 2), 1, 64, 1000), (3, (8, 1), 4, 72, 17), (1, (8, 8), 1, 128, 4129)])
def test_sdpa_backend(B, heads, Tq, D, T, dtype):
    q, k, v, lens = make_inputs(B, *heads, Tq, D, T, lengths_for(B, T), dtype)
    assert_matches(decode_attention(q, k, v, lens, backend="sdpa"), None, q, k, v, lens, dtype)


def test_ragged_lengths_across_tile_edges():
    # Lengths on both sides of the 64-position tile and the 2048-position torch chunk.
    lens = [0, 1, 63, 64, 65, 2047, 2048, 2049, 3000]
    q, k, v, lens = make_inputs(len(lens), 4, 2, 2, 32, 3000, lens, torch.float32)
    o, lse = decode_attention(q, k, v, lens, backend="torch", return_lse=True)
    assert_matches(o, lse, q, k, v, lens, torch.float32)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.isneginf(lse[0]).all()


def test_several_query_tokens_equal_one_token_at_a_time():
    # The causal convention stated in decode.py: the Tq queries are the last Tq positions, so
    # query t is what a single-token decode sees with the cache cut at lens - (Tq - 1 - t).
    Tq = 5
    q, k, v, lens = make_inputs(3, 8, 2, Tq, 64, 300, [300, 120, 3], torch.float32)
    o, lse = decode_attention(q, k, v, lens, backend="torch", return_lse=True)
    for t in range(Tq):
        cut = (lens - (Tq - 1 - t)).clamp(min=0)
        o_t, lse_t = decode_attention(q[:, :, t:t + 1], k, v, cut, backend="torch", return_lse=True)
        torch.testing.assert_close(o[:, :, t:t + 1], o_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:, :, t:t + 1], lse_t, rtol=1e-5, atol=1e-5)
    # Sequence 2 holds 3 keys for 5 queries: its first two queries sit before position 0.
    assert torch.equal(o[2, :, :2], torch.zeros_like(o[2, :, :2])) and torch.isneginf(lse[2, :, :2]).all()


def test_keys_after_moves_the_causal_bound():
    # A cache holding the first 200 of 260 keys: the queries (the last 4 of 260 positions) see
    # every key held here. With keys_after=0 the same cache would hide its last 3 keys.
    q, k, v, lens = make_inputs(2, 4, 4, 4, 32, 200, [200, 150], torch.float32)
    after = torch.tensor([60, 0], dtype=torch.int32)
    o, lse = decode_attention(q, k, v, lens, backend="torch", return_lse=True, keys_after=after)
    assert_matches(o, lse, q, k, v, lens, torch.float32, keys_after=after)
    plain = decode_attention(q, k, v, lens, backend="torch")
    assert not torch.allclose(o[0], plain[0]) and torch.allclose(o[1], plain[1])


def test_auto_is_torch_on_cpu_and_scale_is_honoured():
    q, k, v, lens = make_inputs(2, 8, 2, 1, 64, 100, [100, 37], torch.float32)
    assert torch.equal(decode_attention(q, k, v, lens), decode_attention(q, k, v, lens, backend="torch"))
    ref_o, _ = reference(q, k, v, lens, scale=0.5)
    torch.testing.assert_close(decode_attention(q, k, v, lens, backend="torch", scale=0.5).double(), ref_o,
                               rtol=1e-5, atol=1e-5)


def test_no_lengths_means_the_whole_cache():
    q, k, v, _ = make_inputs(2, 8, 2, 1, 64, 100, [100, 100], torch.float32)
    full = torch.tensor([100, 100], dtype=torch.int32)
    assert_matches(decode_attention(q, k, v, backend="torch"), None, q, k, v, full, torch.float32)
    assert_matches(decode_attention(q, k, v, backend="sdpa"), None, q, k, v, full, torch.float32)


# ------------------------------------------------------------------ errors


def _error(exc, **overrides):
    args = dict(q=torch.zeros(2, 8, 1, 64), k_cache=torch.zeros(2, 2, 10, 64), v_cache=torch.zeros(2, 2, 10, 64))
    args.update(overrides)
    with pytest.raises(exc) as err:
        decode_attention(**args)
    return str(err.value)


def test_errors_name_the_tensor_and_the_rule():
    assert _error(ValueError, q=torch.zeros(2, 8, 64)) == (
        "decode_attention: q has shape (2, 8, 64); it must be 4-D (batch, q_heads, q_tokens, head_dim)")
    assert _error(ValueError, v_cache=torch.zeros(2, 2, 11, 64)) == (
        "decode_attention: k_cache has shape (2, 2, 10, 64) but v_cache (2, 2, 11, 64); they must match")
    assert _error(ValueError, q=torch.zeros(2, 6, 1, 64), k_cache=torch.zeros(2, 4, 10, 64),
                  v_cache=torch.zeros(2, 4, 10, 64)) == (
        "decode_attention: q has 6 heads and k_cache 4; q heads must be a multiple of kv heads (GQA/MQA)")
    assert _error(ValueError, q=torch.zeros(2, 8, 17, 64)) == (
        "decode_attention: q has 17 query tokens (dim 2); decode takes 1..16 (use the prefill attention for "
        "longer chunks)")
    assert _error(ValueError, q=torch.zeros(2, 8, 1, 60), k_cache=torch.zeros(2, 2, 10, 60),
                  v_cache=torch.zeros(2, 2, 10, 60)) == (
        "decode_attention: head_dim 60 (q dim 3) must be a multiple of 8 from 8 to 256")
    assert _error(ValueError, q=torch.zeros(2, 8, 1, 264), k_cache=torch.zeros(2, 2, 10, 264),
                  v_cache=torch.zeros(2, 2, 10, 264)) == (
        "decode_attention: head_dim 264 (q dim 3) must be a multiple of 8 from 8 to 256")
    assert _error(ValueError, q=torch.zeros(3, 8, 1, 64)) == (
        "decode_attention: q has batch 3 but k_cache 2; they must match")
    assert _error(TypeError, q=torch.zeros(2, 8, 1, 64, dtype=torch.bfloat16)) == (
        "decode_attention: dtypes differ (q torch.bfloat16, k_cache torch.float32, v_cache torch.float32); "
        "cast them to one dtype")
    assert _error(TypeError, q=torch.zeros(2, 8, 1, 64, dtype=torch.float64)) == (
        "decode_attention: q has dtype torch.float64; supported are float32, bfloat16, float16")


def test_length_errors():
    assert _error(ValueError, cache_seqlens=torch.tensor([3, 11])) == (
        "decode_attention: cache_seqlens has values in 3..11; they must be in 0..10 (the cache has 10 positions)")
    assert _error(ValueError, cache_seqlens=torch.tensor([-1, 2])) == (
        "decode_attention: cache_seqlens has values in -1..2; they must be in 0..10 (the cache has 10 positions)")
    assert _error(ValueError, cache_seqlens=torch.tensor([3])) == (
        "decode_attention: cache_seqlens has shape (1,); it must be (2,), one length per sequence")
    assert _error(TypeError, cache_seqlens=torch.tensor([3.0, 2.0])) == (
        "decode_attention: cache_seqlens has dtype torch.float32; it must be an integer tensor")


def test_backend_errors():
    assert _error(ValueError, backend="flash") == (
        "decode_attention: backend='flash'; choose one of auto, streamk, splitk, torch, sdpa")
    assert _error(ValueError, backend="sdpa", return_lse=True) == (
        "decode_attention: backend='sdpa' cannot return lse (torch SDPA does not expose it); use backend='torch' "
        "or 'streamk' with return_lse=True")
    assert _error(ValueError, backend="torch", num_programs=0) == (
        "decode_attention: num_programs=0; it must be a positive int (or None for the default)")


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="needs triton imported without the interpreter")
def test_triton_on_cpu_without_interpreter_says_how_to_run_it():
    assert _error(RuntimeError, backend="streamk") == (
        "decode_attention: the Triton kernel got cpu tensors, which it can run only under Triton's interpreter: "
        "set TRITON_INTERPRET=1 in the environment before triton is imported, move the tensors to CUDA, or use "
        "backend='torch'")


# ------------------------------------------------------------------ Triton kernel, interpreted

# (schedule, B, Hq, Hkv, Tq, D, T, lengths, num_programs, dtype, layout)
TRITON_CASES = [
    ("streamk", 1, 8, 8, 1, 64, 1000, [1000], 3, torch.float32, "bhtd"),      # P < heads
    ("streamk", 1, 8, 8, 1, 128, 1000, [1000], 64, torch.float32, "bhtd"),    # P > heads
    ("streamk", 3, 8, 2, 1, 64, 1000, [1000, 0, 1], 5, torch.float32, "bhtd"),
    ("streamk", 3, 8, 2, 4, 72, 1000, [1000, 999, 2], 7, torch.bfloat16, "bhtd"),
    ("streamk", 3, 8, 1, 3, 72, 17, [17, 0, 1], 2, torch.bfloat16, "bhtd"),
    ("streamk", 1, 8, 1, 1, 128, 4129, [4129], 13, torch.float32, "bhtd"),
    ("streamk", 3, 8, 8, 1, 64, 1, [1, 0, 1], 1, torch.float32, "bhtd"),      # one program does it all
    ("streamk", 3, 8, 2, 1, 64, 17, [17, 5, 0], 200, torch.float32, "bhtd"),  # more programs than tiles
    ("streamk", 2, 8, 1, 16, 64, 100, [100, 60], 4, torch.float16, "bhtd"),   # 128 rows: two row groups
    ("streamk", 2, 4, 4, 1, 256, 200, [200, 130], 5, torch.float16, "bthd"),  # largest head dim, strided
    ("splitk", 3, 8, 2, 1, 64, 1000, [1000, 0, 1], 24, torch.float32, "bhtd"),
    ("splitk", 1, 8, 8, 1, 128, 4129, [4129], 64, torch.float32, "bhtd"),
    ("splitk", 3, 8, 1, 3, 72, 17, [17, 0, 1], 16, torch.bfloat16, "bthd"),
]


def _case_id(case):
    sched, B, Hq, Hkv, Tq, D, T, lens, P, dtype, layout = case
    return f"{sched}-B{B}-{Hq}x{Hkv}-Tq{Tq}-D{D}-T{T}-P{P}-{str(dtype)[6:]}-{layout}"


def span_crossings(B, Hq, Hkv, Tq, D, lens, P):
    """Which boundaries the stream-K spans of a case cross: {'split', 'head', 'batch'}.

    'split': a segment's tiles are shared by several programs (partials are merged);
    'head' / 'batch': one program's span runs from one kv head (batch) into the next.
    """
    from distvit.attention.decode_triton import block_sizes, tile_starts

    G = Hq // Hkv
    bm, bn, _ = block_sizes(D, G * Tq)
    groups = -(-G * Tq // bm)
    starts = tile_starts(torch.tensor(lens, dtype=torch.int32), Hkv, groups, bn).tolist()
    total = starts[-1]
    span = -(-total // P)
    owner = []  # (batch, kv head) of each tile on the line
    for seg in range(len(starts) - 1):
        owner += [((seg // groups) // Hkv, (seg // groups) % Hkv)] * (starts[seg + 1] - starts[seg])
    found = set()
    for p in range(P):
        tiles = owner[p * span:(p + 1) * span]
        for (b0, h0), (b1, h1) in zip(tiles, tiles[1:]):
            found |= {"batch"} if b0 != b1 else ({"head"} if h0 != h1 else set())
    for seg in range(len(starts) - 1):
        if starts[seg + 1] > starts[seg] and starts[seg] // span != (starts[seg + 1] - 1) // span:
            found.add("split")
    return found


def test_the_triton_cases_cross_every_kind_of_boundary():
    # Guards the case list: the stream-K cases must cut heads over several programs and run
    # single spans across head and across batch boundaries.
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    seen = {"split": 0, "head": 0, "batch": 0}
    for sched, B, Hq, Hkv, Tq, D, T, lens, P, dtype, layout in TRITON_CASES:
        if sched == "streamk":
            for kind in span_crossings(B, Hq, Hkv, Tq, D, lens, P):
                seen[kind] += 1
    assert all(n >= 2 for n in seen.values()), seen
    assert span_crossings(3, 8, 2, 1, 64, [1000, 0, 1], 5) == {"split", "head", "batch"}


@pytest.mark.skipif(not INTERPRETED, reason="interpreted Triton: runs with TRITON_INTERPRET=1 "
                    "(test_triton_cases_in_subprocess does that)")
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_interp_triton_kernel(case):
    sched, B, Hq, Hkv, Tq, D, T, lens, P, dtype, layout = case
    q, k, v, lens = make_inputs(B, Hq, Hkv, Tq, D, T, lens, dtype, layout=layout)
    o, lse = decode_attention(q, k, v, lens, backend=sched, num_programs=P, return_lse=True)
    assert_matches(o, lse, q, k, v, lens, dtype)


@pytest.mark.skipif(not INTERPRETED, reason="interpreted Triton: runs with TRITON_INTERPRET=1")
@pytest.mark.parametrize("sched", ["streamk", "splitk"])
def test_interp_keys_after(sched):
    q, k, v, lens = make_inputs(2, 8, 2, 4, 64, 300, [300, 100], torch.float32)
    after = torch.tensor([50, 0], dtype=torch.int32)
    o, lse = decode_attention(q, k, v, lens, backend=sched, num_programs=6, return_lse=True, keys_after=after)
    assert_matches(o, lse, q, k, v, lens, torch.float32, keys_after=after)


@pytest.mark.skipif(INTERPRETED, reason="already under the interpreter: the cases run in this process")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_cases_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_interp_"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    expected = len(TRITON_CASES) + 2
    assert re.search(rf"\b{expected} passed\b", run.stdout), run.stdout[-3000:]


# ------------------------------------------------------------------ Triton kernel, compiled


def _compile(dtype, D, G, Tq, splitk, arch):
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget

    from distvit.attention import decode_triton as dt

    bm, bn, bd = dt.block_sizes(D, G * Tq)
    elem = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    pointers = dict(Q=elem, K=elem, V=elem, O=elem, LSE="fp32", LENS="i32", VISIBLE="i32", SEG_START="i32",
                    ACC_WS="fp32", ML_WS="fp32", COUNTERS="i32")
    constexprs = dict(G=G, TQ=Tq, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, SPLITK=splitk, DOT_FP32=False)
    signature = {}
    for name in inspect.signature(dt._decode_kernel.fn).parameters:
        if name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    src = triton.compiler.ASTSource(fn=dt._decode_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=4, num_stages=dt.num_stages(dtype)))


SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block, A100 / H100


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="compiles the non-interpreted kernel")
@pytest.mark.parametrize("dtype,D,G,Tq,splitk,arch", [
    (torch.bfloat16, 128, 4, 1, False, 90),   # the benchmark shape
    (torch.float32, 256, 8, 16, True, 80),    # largest tiles, on the smaller shared memory
    (torch.float16, 72, 8, 3, False, 80),
])
def test_kernel_compiles_for_gpu_targets(dtype, D, G, Tq, splitk, arch):
    # The interpreter accepts code the compiler rejects: compile to a GPU binary here (no GPU
    # needed) and check the shared memory fits the architecture.
    kernel = _compile(dtype, D, G, Tq, splitk, arch)
    assert len(kernel.asm["cubin"]) > 0
    assert kernel.metadata.shared <= SHARED_MEMORY_LIMIT[arch]


# ------------------------------------------------------------------ Triton kernel on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sched", ["streamk", "splitk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,heads,Tq,D,T,lens", [
    (1, (32, 8), 1, 128, 65536, [65536]),
    (4, (8, 1), 3, 72, 5000, [5000, 0, 1, 3333]),
    (3, (8, 8), 16, 256, 1000, [1000, 999, 64]),
])
def test_cuda_kernel(sched, dtype, B, heads, Tq, D, T, lens):
    q, k, v, lens = make_inputs(B, *heads, Tq, D, T, lens, dtype)
    q, k, v, lens = q.cuda(), k.cuda(), v.cuda(), lens.cuda()
    for num_programs in (None, 3, 1000):
        o, lse = decode_attention(q, k, v, lens, backend=sched, num_programs=num_programs, return_lse=True)
        assert_matches(o.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu(), lens.cpu(), dtype)
        # Arrival counters reset themselves: a second call gives the same numbers.
        o2 = decode_attention(q, k, v, lens, backend=sched, num_programs=num_programs)
        assert torch.equal(o, o2)
