"""Generation with the causal ViT: one new patch token with the KV cache vs recomputing the full forward.

At a context of L tokens, the cached step feeds one token through the model and attends it to
the L cached keys (decode_attention); the peer, in the same run, recomputes the causal forward
over all L + 1 tokens and keeps the last prediction (what generation without a cache does every
step). Figure of merit: new tokens per second (batch / step time); ratio = cached / recompute.

    python benchmarks/generate.py --device cpu --out benchmarks/results/generate_cpu.jsonl
    python benchmarks/generate.py --device cuda     # cached with streamk and with sdpa, vs recompute

Model: vit_causal_digits' width (64, 4 heads, 4 blocks) over a 128x128 grid of 2x2 patches
(4096 positions) on CPU; --width/--depth/--heads for a larger one (ViT-B: 768/12/12) on a GPU.
Prints one JSON line per (context, backend).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from distvit.models.causal_vit import CausalViT, CausalViTConfig


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--contexts", default="16,64,256,1024,4095")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grid", type=int, default=64, help="patches per side: grid**2 positions (>= the largest context + 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per result (median reported)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return p.parse_args()


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up (kernel compilation, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure(model: CausalViT, context: int, batch: int, backend: str, device, dtype, repeats: int) -> tuple[float, float]:
    """(cached step seconds, recompute step seconds) for one new token after `context` tokens."""
    D = model.cfg.embed_dim
    g = torch.Generator(device="cpu").manual_seed(context)
    seq = (torch.randn(batch, context + 1, D, generator=g) * 0.5).to(device, dtype) + model.pos_embed[:, :context + 1]
    cache = model.new_cache(batch, backend=backend)
    chunk = 1024  # prefill in chunks: same numbers as one pass, bounded memory
    for start in range(0, context, chunk):
        model.forward_tokens(seq[:, start:min(start + chunk, context)], cache)
    new = seq[:, context:]

    def cached():
        cache.seqlens.fill_(context)
        return model.forward_tokens(new, cache)

    def recompute():
        return model.forward_tokens(seq)[:, -1:]

    out_c, out_r = cached(), recompute()  # the same prediction both ways
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    if not torch.allclose(out_c.float(), out_r.float(), rtol=tol, atol=tol):
        raise AssertionError(f"context {context}: cached and recomputed predictions differ by "
                             f"{(out_c.float() - out_r.float()).abs().max():.3g}")
    return _time(cached, device, repeats), _time(recompute, device, repeats)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = CausalViTConfig(img_size=2 * args.grid, patch_size=2, in_chans=1, embed_dim=args.width, depth=args.depth,
                          num_heads=args.heads, attn_backend="sdpa")
    torch.manual_seed(0)
    model = CausalViT(cfg).to(device, dtype).eval()
    contexts = [int(c) for c in args.contexts.split(",")]
    if max(contexts) + 1 > model.num_patches:
        raise SystemExit(f"--contexts up to {max(contexts)} need --grid >= {int((max(contexts) + 1) ** 0.5) + 1}")
    backends = ["streamk", "sdpa"] if device.type == "cuda" else ["torch"]
    for context in contexts:
        for backend in backends:
            t_cache, t_full = measure(model, context, args.batch, backend, device, dtype, args.repeats)
            row = {
                "bench": "generate", "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                "width": args.width, "depth": args.depth, "heads": args.heads, "batch": args.batch,
                "context": context, "backend": backend, "cached_tokens_per_s": args.batch / t_cache,
                "peer": "recompute", "recompute_tokens_per_s": args.batch / t_full, "ratio": t_full / t_cache,
                "torch": torch.__version__,
            }
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
