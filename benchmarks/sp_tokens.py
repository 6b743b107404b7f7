"""Tokens per sample vs sp size: the longest image (in patch tokens) one rank trains within a memory
budget, with and without activation checkpointing; the peer is sp = 1 without checkpointing, in the
same run.

A whole ViT (distvit.models.vit.VisionTransformer, patch 16, --dim/--depth/--heads) trains on one
square image per step (forward + backward of cross-entropy), its tokens split over sp ranks by
distvit.parallel.parallelize.parallelize_sequence (Ulysses; ring where heads do not divide by sp).
For each (sp, checkpointing) the image side grows through --sides until a rank's peak memory
passes --budget-mb (or the list ends); each measured size is one JSON line, and one summary line
per (sp, checkpointing) gives the largest side that fit and its ratio to the peer's.

Peak memory per rank as benchmarks/sequence_parallel.py measures it: peak RSS (VmHWM reset through
/proc/self/clear_refs) minus RSS before the first step, glibc returning allocations >= 1 MiB on
free; max over ranks; counted over the timed steps only (after a warm-up step, whose one-time
allocations are not the sequence's). Step time: median of the timed steps, max over ranks.

    python benchmarks/sp_tokens.py --out benchmarks/results/sp_tokens_cpu.jsonl
    python benchmarks/sp_tokens.py --sp 1 2 4 --sides 256 512 768 1024 --budget-mb 300
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sequence_parallel import MEMORY_MEASURE, _free_port, _memory_mb, _reset_peak  # noqa: E402

PATCH = 16


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--sides", type=int, nargs="+", default=[256, 384, 512, 640, 768, 896, 1024])
    p.add_argument("--budget-mb", type=float, default=64.0, help="peak activation memory allowed per rank")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="timed (and memory-measured) steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", help="also append the JSON lines to this file")
    return p.parse_args()


def _model(side: int, ckpt: bool, group, sp: int, args):
    import torch

    from distvit.parallel.parallelize import parallelize_sequence
    from distvit.models.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=side, patch_size=PATCH, in_chans=3, num_classes=10, embed_dim=args.dim,
                              depth=args.depth, num_heads=args.heads)
    model.set_grad_checkpointing(ckpt)
    if sp > 1:
        parallelize_sequence(model, group, "ulysses" if args.heads % sp == 0 else "ring")
    return model


def _measure(side: int, ckpt: bool, group, sp: int, args) -> dict:
    import torch
    import torch.nn.functional as F

    model = _model(side, ckpt, group, sp, args)
    g = torch.Generator().manual_seed(side)
    x = torch.randn(1, 3, side, side, generator=g)
    y = torch.tensor([3])
    times, base = [], None
    for step in range(args.steps + 1):
        model.zero_grad(set_to_none=True)
        if step == 1:  # after the warm-up: one-time allocations (gloo buffers, thread pools) are not counted
            base = _reset_peak()
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        if step:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_mem_mb": _memory_mb()[1] - base}


def _worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = []
        for ckpt in (False, True):
            for side in args.sides:
                r = _measure(side, ckpt, None, world, args)
                worst = torch.tensor([r["peak_mem_mb"], r["step_s"]])
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                rows.append({"ckpt": ckpt, "side": side, "peak_mem_mb": worst[0].item(), "step_s": worst[1].item()})
                if worst[0].item() > args.budget_mb:  # every rank sees the same max: all stop together
                    break
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _run(sp: int, args) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(sp, _free_port(), args, out), nprocs=sp, join=True)
        return json.loads(Path(out, "rank0.json").read_text())


def main() -> int:
    args = parse()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    common = {"bench": "sp_tokens", "device": "cpu", "backend": "gloo", "model": "vit", "patch": PATCH,
              "dim": args.dim, "depth": args.depth, "heads": args.heads, "threads_per_rank": args.threads,
              "budget_mb": args.budget_mb, "memory_measure": MEMORY_MEASURE}
    lines, best = [], {}
    for sp in args.sp:
        for row in _run(sp, args):
            tokens = (row["side"] // PATCH) ** 2 + 1
            fits = row["peak_mem_mb"] <= args.budget_mb
            if fits:
                best[(sp, row["ckpt"])] = max(best.get((sp, row["ckpt"]), (0, 0)), (tokens, row["side"]))
            lines.append({**common, "kind": "point", "sp": sp, "activation_checkpointing": row["ckpt"],
                          "side_px": row["side"], "tokens_per_sample": tokens, "tokens_per_rank": -(-tokens // sp),
                          "peak_mem_mb": round(row["peak_mem_mb"], 1), "step_s": round(row["step_s"], 3),
                          "fits_budget": fits})
            print(json.dumps(lines[-1]), flush=True)
    peer = best.get((1, False))
    for (sp, ckpt), (tokens, side) in sorted(best.items()):
        lines.append({**common, "kind": "max_fit", "sp": sp, "activation_checkpointing": ckpt,
                      "max_side_px": side, "max_tokens_per_sample": tokens, "peer": "sp=1, no checkpointing",
                      "peer_max_tokens_per_sample": peer[0] if peer else None,
                      "tokens_vs_peer": round(tokens / peer[0], 3) if peer else None,
                      "capped_by_sides": side == max(args.sides)})
        print(json.dumps(lines[-1]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
