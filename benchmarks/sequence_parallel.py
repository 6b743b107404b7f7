"""Sequence-parallel attention: step time and peak memory per rank vs sp = 1, with DeepSpeed's
ViT wrapper as the peer in the same run.

The measured layer is one ViT attention layer (distvit.models.layers.Attention: qkv projection,
attention, output projection) on hidden states (batch, tokens, dim), forward + backward:
- single (sp = 1): the layer on all tokens, one process.
- ulysses / ring (ours): each of sp ranks holds tokens / sp tokens; Attention.attend runs
  distvit.parallel.sequence_parallel.ulysses_attention / ring_attention.
- deepspeed_allgather (the peer): deepspeed.sequence.autosp_vit.UlyssesSPViTAttention around
  the same layer: it all-gathers the hidden states, runs the whole layer on all tokens on
  every rank, and keeps its slice.

Peak memory (CPU): the peak resident set size of each rank (VmHWM, reset through
/proc/self/clear_refs before every configuration) minus its RSS just before the first step,
so it counts what forward + backward allocate (activations, scores, communication buffers),
not the weights and inputs. glibc is told to return every allocation >= 1 MiB to the system
on free (MALLOC_MMAP_THRESHOLD_) so the RSS follows the live tensors. Reported as the maximum
over ranks. Step time: median over the timed steps, maximum over ranks (the ring waits for
the slowest rank). Every rank also checks its output and input gradient against the sp = 1
layer for token counts <= --check-max-tokens (max abs error in the JSON).

One JSON line per (impl, sp, tokens), with ratios to sp = 1 and to the peer at the same sp.

    python benchmarks/sequence_parallel.py                                 # CPU, gloo
    python benchmarks/sequence_parallel.py --tokens 1024 4096 16384 --sp 2 4 --dim 512 --heads 8
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

IMPLS = ("ulysses", "ring", "deepspeed_allgather")
PEER = "deepspeed_allgather"
MEMORY_MEASURE = ("peak RSS (VmHWM reset via /proc/self/clear_refs) minus RSS before the first step, "
                  "max over ranks; glibc MALLOC_MMAP_THRESHOLD_=1MiB")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--sp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--check-max-tokens", type=int, default=1024)
    p.add_argument("--out", help="also append the JSON lines to this file")
    return p.parse_args()


def _memory_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    status = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM"))
    return rss, hwm


def _reset_peak() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    return _memory_mb()[0]


def _inputs(tokens: int, args):
    import torch

    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(args.batch, tokens, args.dim, generator=g)
    return x, torch.randn(x.shape, generator=g)


def _layer(args):
    import torch

    from distvit.models.layers import Attention

    torch.manual_seed(0)
    return Attention(args.dim, args.heads, qkv_bias=True)


def _build(impl: str, tokens: int, group, args):
    """(module taking this rank's hidden states, layer whose weights it uses)."""
    from distvit.parallel.parallelize import SequenceParallelPlan

    layer = _layer(args)
    if impl == "single":
        return layer, layer
    if impl == PEER:
        from deepspeed.sequence.autosp_vit import UlyssesSPViTAttention

        return UlyssesSPViTAttention(layer, group, has_cls_token=False), layer
    import torch.distributed as dist

    plan = SequenceParallelPlan(group, dist.get_world_size(group), dist.get_rank(group), impl, "contiguous", "allreduce")
    layer.attend = lambda q, k, v, bias=None: plan.attend(q, k, v, causal=False, scale=layer.scale,
                                                          backend=layer.attn_backend, seq_len=tokens)
    return layer, layer


def _measure(impl: str, tokens: int, rank: int, world: int, group, args) -> dict:
    import torch

    from distvit.parallel.sequence_parallel import shard_tokens

    x_full, g_full = _inputs(tokens, args)
    x = shard_tokens(x_full, 1, rank, world).clone().requires_grad_()
    grad_out = shard_tokens(g_full, 1, rank, world).clone()
    check = tokens <= args.check_max_tokens
    if check:
        ref_layer = _layer(args)
        xr = x_full.clone().requires_grad_()
        ref_out = ref_layer(xr)
        ref_out.backward(g_full)
        ref_out, ref_dx = shard_tokens(ref_out.detach(), 1, rank, world), shard_tokens(xr.grad, 1, rank, world)
        del ref_layer, xr
    del x_full, g_full
    module, _ = _build(impl, tokens, group, args)
    base = _reset_peak()
    times = []
    for step in range(args.steps + 1):
        x.grad = None
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = module(x)
        out.backward(grad_out)
        if step:  # the first step is the warm-up
            times.append(time.perf_counter() - t0)
    peak = _memory_mb()[1] - base
    result = {"step_ms": 1e3 * statistics.median(times), "peak_mem_mb": peak}
    if check:
        dx = x.grad if x.grad is not None else torch.zeros_like(x)
        result["max_abs_err_out"] = (out.detach() - ref_out).abs().max().item()
        result["max_abs_err_dx"] = (dx - ref_dx).abs().max().item()
    return result


def _worker(rank: int, world: int, port: int, impls: list[str], args, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if world > 1:
            import deepspeed.comm

            deepspeed.comm.init_distributed(dist_backend="gloo", verbose=False)
        rows = []
        for tokens in args.tokens:
            for impl in impls:
                dist.barrier()
                rows.append({"impl": impl, "tokens": tokens, **_measure(impl, tokens, rank, world, None, args)})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, impls: list[str], args) -> dict:
    """{(impl, tokens): row with the max over ranks}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), impls, args, out), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    merged = {}
    for rows in zip(*ranks):
        key = (rows[0]["impl"], rows[0]["tokens"])
        merged[key] = {k: max(r[k] for r in rows) for k in rows[0] if k not in ("impl", "tokens")}
    return merged


def main() -> int:
    args = parse()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # read by the spawned ranks' glibc at start
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    single = _run(1, ["single"], args)
    lines = []
    for sp in args.sp:
        impls = [i for i in args.impls if i != "ulysses" or args.heads % sp == 0]
        results = _run(sp, impls, args)
        for (impl, tokens), r in results.items():
            base, peer = single[("single", tokens)], results.get((PEER, tokens))
            line = {
                "bench": "sequence_parallel", "level": "attention_layer", "device": "cpu", "backend": "gloo",
                "impl": impl, "peer": PEER, "sp": sp, "tokens": tokens, "dim": args.dim, "heads": args.heads,
                "batch": args.batch, "threads_per_rank": args.threads,
                "step_ms": round(r["step_ms"], 2), "peak_mem_mb": round(r["peak_mem_mb"], 1),
                "sp1_step_ms": round(base["step_ms"], 2), "sp1_peak_mem_mb": round(base["peak_mem_mb"], 1),
                "time_vs_sp1": round(r["step_ms"] / base["step_ms"], 3),
                "mem_vs_sp1": round(r["peak_mem_mb"] / max(base["peak_mem_mb"], 1e-9), 3),
                "time_vs_peer": round(r["step_ms"] / peer["step_ms"], 3) if peer else None,
                "mem_vs_peer": round(r["peak_mem_mb"] / max(peer["peak_mem_mb"], 1e-9), 3) if peer else None,
                "max_abs_err_out": r.get("max_abs_err_out"), "max_abs_err_dx": r.get("max_abs_err_dx"),
                "memory_measure": MEMORY_MEASURE,
            }
            lines.append(json.dumps(line))
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
