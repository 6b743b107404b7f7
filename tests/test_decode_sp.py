"""Decode over a KV cache split along the sequence across ranks equals single-rank decode.

Layout: rank r of `world` holds cache positions [r * C, (r + 1) * C) of every sequence
(C = capacity / world), so a short sequence leaves the later ranks empty. Tolerance 1e-5 in
float32: the ranks' partials are merged exactly, only the summation order changes.
"""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distvit.attention.decode import decode_attention
from distvit.parallel.decode_sp import decode_attention_sp
from distvit.attention.merge import merge_partials

CAPACITY = 240
LENGTHS = [240, 100, 0, 61]  # full, ends on rank 1 (of 2) or 2 (of 4), empty, ends inside rank 0/1


def _inputs(Tq):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(len(LENGTHS), 8, Tq, 64, generator=g)
    k = torch.randn(len(LENGTHS), 2, CAPACITY, 64, generator=g)
    v = torch.randn(len(LENGTHS), 2, CAPACITY, 64, generator=g)
    return q, k, v, torch.tensor(LENGTHS, dtype=torch.int32)


def _slice(k, v, lens, rank, world):
    chunk = CAPACITY // world
    start = rank * chunk
    local = (lens - start).clamp(0, chunk).to(torch.int32)
    after = (lens - start - chunk).clamp(min=0).to(torch.int32)
    return k[:, :, start:start + chunk], v[:, :, start:start + chunk], local, after


@pytest.mark.parametrize("Tq", [1, 4])
@pytest.mark.parametrize("world", [2, 3])
def test_slices_merged_in_one_process_equal_full_decode(world, Tq):
    # The SP reduction without processes: decode each slice with its keys_after, merge.
    q, k, v, lens = _inputs(Tq)
    o_ref, lse_ref = decode_attention(q, k, v, lens, backend="torch", return_lse=True)
    outs, lses = [], []
    for rank in range(world):
        k_r, v_r, local, after = _slice(k, v, lens, rank, world)
        o_r, lse_r = decode_attention(q, k_r, v_r, local, backend="torch", return_lse=True, keys_after=after)
        outs.append(o_r)
        lses.append(lse_r)
    o, lse = merge_partials(outs, lses)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, Tq, pass_keys_after):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q, k, v, lens = _inputs(Tq)
        k_r, v_r, local, after = _slice(k, v, lens, rank, world)
        calls = []
        real_all_gather = dist.all_gather
        dist.all_gather = lambda *a, **kw: calls.append(1) or real_all_gather(*a, **kw)
        try:
            o, lse = decode_attention_sp(q, k_r, v_r, local, keys_after=after if pass_keys_after else None,
                                         backend="torch", return_lse=True)
        finally:
            dist.all_gather = real_all_gather
        torch.save({"o": o, "lse": lse, "collectives": len(calls)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
@pytest.mark.parametrize("world,Tq,pass_keys_after", [(2, 1, False), (4, 1, False), (2, 4, False), (4, 4, True)])
def test_sequence_parallel_decode_equals_single_rank(tmp_path, world, Tq, pass_keys_after):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), Tq, pass_keys_after), nprocs=world, join=True)
    q, k, v, lens = _inputs(Tq)
    o_ref, lse_ref = decode_attention(q, k, v, lens, backend="torch", return_lse=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["o"], o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["lse"], lse_ref, rtol=1e-5, atol=1e-5)
        # One collective for the merge; one more, for the lengths, only when Tq > 1 and the
        # caller did not say how many keys follow.
        assert got["collectives"] == (2 if Tq > 1 and not pass_keys_after else 1)
    # Sequence 2 is empty everywhere: zero output and lse -inf after the merge too.
    assert torch.equal(got["o"][2], torch.zeros_like(got["o"][2])) and torch.isneginf(got["lse"][2]).all()
