"""What fits on one device: tokens per sample with activation checkpointing, and the largest ViT
that trains with interleaved offload. Both searched in one run, each beside its peer.

tokens   ViT (default ViT-B/16) at batch 1, bf16 autocast, one forward+backward per image size,
         the size doubling (tokens = (size/patch)^2) until the device runs out of memory or the
         time budget ends; activation checkpointing on and off, side by side (the peer).
largest  registered ViTs in growing size (large, huge, giant), one ZeRO-3 step each in a child
         process (benchmarks/offload.py --modes interleaved / none), until one fails or the budget
         ends; `none` (no offload) is the peer. With the state on the host, the device holds bf16
         weights and gradients plus the slots: the bound from memory (printed) is far above the
         largest registered ViT on an H200, so "largest" means the largest that ran here.
One JSON line per attempt and one summary line per search.

    python benchmarks/gpu_capacity.py --device cuda --budget-s 120
    python benchmarks/gpu_capacity.py --device cpu --quick         # tiny sizes, checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
LADDER = ["vit_large_patch16_224", "vit_huge_patch14_224", "vit_giant_patch14_224"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="vit_base_patch16_224", help="the model of the tokens search")
    p.add_argument("--start-size", type=int, default=224)
    p.add_argument("--max-size", type=int, default=16384)
    p.add_argument("--budget-s", type=float, default=120.0, help="wall-clock budget of both searches together")
    p.add_argument("--quick", action="store_true", help="CPU check: vit_tiny, 32..128 px, the mlp in the offload search")
    p.add_argument("--skip", default="", help="comma list of searches to skip: tokens, largest")
    args = p.parse_args()
    if args.quick:
        args.model, args.start_size, args.max_size = "vit_tiny_patch16_224", 32, 128
    return args


def out(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def one_step(name: str, size: int, ckpt: bool, device: torch.device) -> dict:
    from distvit.models.registry import create

    model = create(name, img_size=size, num_classes=1000, drop_path_rate=0.0).to(device)
    model.set_grad_checkpointing(ckpt)
    x = torch.randn(1, 3, size, size, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row = {"seconds": time.perf_counter() - t0, "tokens": model.patch_embed.num_patches}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def tokens_search(args, device, deadline: float) -> None:
    best = {}
    for ckpt in (True, False):
        size, best[ckpt] = args.start_size, None
        while size <= args.max_size and time.monotonic() < deadline:
            base = {"bench": "gpu_capacity", "search": "tokens", "model": args.model, "grad_checkpointing": ckpt,
                    "img_size": size, "batch": 1}
            try:
                row = one_step(args.model, size, ckpt, device)
                out({**base, "ok": True, **row})
                best[ckpt] = {"img_size": size, "tokens": row["tokens"]}
            except Exception as err:  # noqa: BLE001 - report what stopped it, then stop this side
                out({**base, "ok": False, "oom": _is_oom(err), "error": str(err).splitlines()[0][:200]})
                break
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            size *= 2
        else:
            if size <= args.max_size:
                best[ckpt] = {**(best[ckpt] or {}), "stopped_by": "time budget"}
    on, off = best[True], best[False]
    ratio = on["tokens"] / off["tokens"] if on and off and "tokens" in on and "tokens" in off else None
    out({"bench": "gpu_capacity", "search": "tokens", "summary": True, "model": args.model,
         "max_with_checkpointing": on, "max_without": off, "tokens_ratio": ratio,
         "note": "sizes double: the true limit lies between the last ok size and the next"})


def largest_search(args, device, deadline: float) -> None:
    ladder = ["mlp"] if args.quick else LADDER
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    largest = {}
    for mode in ("interleaved", "none"):
        for name in ladder:
            left = deadline - time.monotonic()
            if left < 5:
                break
            cmd = [sys.executable, str(ROOT / "benchmarks" / "offload.py"), "--device", args.device, "--model", name,
                   "--modes", mode, "--steps", "1", "--warmup", "0", "--batch", "8" if args.quick else "16"]
            if device.type == "cuda":
                cmd += ["--precision", "bf16", "--sub-group-size", "50000000"]
            base = {"bench": "gpu_capacity", "search": "largest", "mode": mode, "model": name}
            try:
                run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                out({**base, "ok": False, "error": "time budget ended during the attempt"})
                break
            rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
            row = next((r for r in rows if r.get("mode") == mode), None)
            ok = run.returncode == 0 and row is not None and "step_s" in row
            err = None if ok else (run.stderr.strip().splitlines() or ["no output"])[-1][:200]
            out({**base, "ok": ok, **({k: row[k] for k in ("step_s", "peak_mem_gib", "params") if row and k in row}),
                 **({"error": err} if err else {})})
            if not ok:
                break
            largest[mode] = name
    bound = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # ZeRO-3 on one device with the optimizer state on the host: bf16 weights + bf16 grads
        # (4 B/param) on the device, fp32 master + Adam moments + grads (16 B/param) on the host.
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            host = None
        bound = {"device_bound_params": free / 4, "host_bound_params": host / 16 if host else None}
    out({"bench": "gpu_capacity", "search": "largest", "summary": True, "largest_interleaved": largest.get("interleaved"),
         "largest_no_offload": largest.get("none"), "memory_model_bound": bound,
         "note": "the ladder is the registered ViTs; the bound is arithmetic, not a run"})


def main() -> int:
    args = parse()
    device = torch.device(args.device)
    deadline = time.monotonic() + args.budget_s
    skip = set(filter(None, args.skip.split(",")))
    if "tokens" not in skip:
        # half the budget each when both run; the largest search gets whatever the first leaves
        tokens_search(args, device, deadline - (0 if "largest" in skip else args.budget_s / 2))
    if "largest" not in skip:
        largest_search(args, device, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
