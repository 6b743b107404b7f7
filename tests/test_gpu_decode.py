"""Compiled stream-K and split-K decode kernels on CUDA against float64 (`pytest -m gpu`).

The CPU counterpart of every case here is the interpreted kernel (test_decode_attention.py,
test_interp_triton_kernel, run under TRITON_INTERPRET=1 in CI): the same TRITON_CASES, so the
compiled kernel is checked over the same class of shapes (GQA, head dims that are multiples of 8
but not powers of two, ragged lengths with 0 and 1, spans crossing head and batch boundaries,
more programs than tiles), then at sizes the interpreter cannot reach. What only real
concurrency can break (atomics, acquire/release ordering of the partials, the arrival counters
resetting themselves) is stressed by launching the same problem many times: the merge order is
fixed, so every launch must give the same bits.
"""
from __future__ import annotations

import pytest
import torch

from gpu_helpers import CUDA
from test_decode_attention import TRITON_CASES, _case_id, assert_matches, make_inputs

from distvit.attention import decode_attention

pytestmark = pytest.mark.parametrize("device", [CUDA])

LARGE_CASES = [  # the same class of shapes, sized so every SM holds several spans (float64 reference on the host: <= 2 GB)
    ("streamk", 4, 16, 4, 1, 128, 32768, [32768, 1, 0, 20001], None, torch.bfloat16, "bhtd"),
    ("streamk", 4, 28, 4, 4, 72, 20000, [20000, 12345, 0, 1], 1000, torch.float16, "bthd"),
    ("streamk", 2, 16, 2, 1, 200, 33000, [33000, 31], 7, torch.float32, "bhtd"),
    ("splitk", 4, 16, 4, 1, 128, 32768, [32768, 1, 0, 20001], None, torch.bfloat16, "bhtd"),
    ("splitk", 4, 28, 4, 4, 72, 20000, [20000, 12345, 0, 1], 1000, torch.float16, "bthd"),
]


def _on(device, case):
    sched, B, Hq, Hkv, Tq, D, T, lens, P, dtype, layout = case
    q, k, v, lens_t = make_inputs(B, Hq, Hkv, Tq, D, T, lens, dtype, layout=layout)
    return sched, P, dtype, (q, k, v, lens_t), tuple(t.to(device) for t in (q, k, v, lens_t))


@pytest.mark.parametrize("case", TRITON_CASES + LARGE_CASES, ids=_case_id)
def test_compiled_kernel_matches_float64(device, case):
    sched, P, dtype, host, dev = _on(device, case)
    o, lse = decode_attention(*dev, backend=sched, num_programs=P, return_lse=True)
    assert o.device.type == "cuda"
    assert_matches(o.cpu(), lse.cpu(), *host, dtype)


@pytest.mark.parametrize("sched", ["streamk", "splitk"])
def test_keys_after_bound_compiled(device, sched):
    q, k, v, lens = make_inputs(2, 8, 2, 4, 64, 3000, [3000, 100], torch.bfloat16)
    after = torch.tensor([50, 0], dtype=torch.int32)
    o, lse = decode_attention(q.to(device), k.to(device), v.to(device), lens.to(device), backend=sched,
                              num_programs=6, return_lse=True, keys_after=after.to(device))
    assert_matches(o.cpu(), lse.cpu(), q, k, v, lens, torch.bfloat16, keys_after=after)


@pytest.mark.parametrize("sched", ["streamk", "splitk"])
def test_repeated_launches_give_the_same_bits(device, sched):
    # 300 launches over program counts that change the span layout (and the counters used) each
    # time, interleaved without synchronizing: a counter not reset, or a partial read before it
    # landed, gives different bits on some launch.
    q, k, v, lens = make_inputs(4, 32, 8, 1, 128, 16384, [16384, 1, 9000, 0], torch.bfloat16)
    q, k, v, lens = (t.to(device) for t in (q, k, v, lens))
    programs = [None, 7, 132, 1000]
    first = {P: decode_attention(q, k, v, lens, backend=sched, num_programs=P) for P in programs}
    assert_matches(first[None].cpu(), None, q.cpu(), k.cpu(), v.cpu(), lens.cpu(), torch.bfloat16)
    outs = []
    for i in range(300):
        P = programs[i % len(programs)]
        outs.append((P, decode_attention(q, k, v, lens, backend=sched, num_programs=P)))
    torch.cuda.synchronize()
    bad = [i for i, (P, o) in enumerate(outs) if not torch.equal(o, first[P])]
    assert not bad, f"{len(bad)} of {len(outs)} launches differ from the first (first at launch {bad[0]})"
