"""Decode attention over a long KV cache: stream-K vs split-K vs torch SDPA (and flash-attn).

One query token, B=1, Hq=32, Hkv=8, D=128 (a GQA decoder), context 4k..512k on a GPU and
4k..64k on CPU. Decode is memory bound, so the figure of merit is the KV-cache bandwidth,
bytes(K) + bytes(V) / time, against the device's peak from a table (GPU) or a measured
memcpy (CPU). Every result is compared with torch SDPA timed in the same run.

    python benchmarks/decode_attention.py --device cuda          # streamk, splitk, sdpa, flash
    python benchmarks/decode_attention.py --device cpu           # torch path vs sdpa

Prints one JSON line per (context, backend); --out also appends them to a file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from distvit.attention.decode import decode_attention

# HBM peak in bytes/s by device name (substring match, first hit wins: specific names first).
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40GB SXM4 and PCIe
    ("L40S", 0.864e12),
    ("A10G", 0.6e12),
    ("RTX 4090", 1.008e12),
]

KB = 1024


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--contexts", default=None,
                   help="comma-separated context lengths (default 4k..512k on cuda, 4k..64k on cpu)")
    p.add_argument("--backends", default=None,
                   help="comma-separated, from streamk,splitk,torch,flash (sdpa always runs: it is the peer)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per result (median reported)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return p.parse_args()


def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BANDWIDTH:
            if key in name:
                return peak, f"table: {key}"
        return None, f"unknown device {name!r}: add it to PEAK_BANDWIDTH"
    # CPU: no table; the peer is a large memcpy (read + write bytes over time), best of 5.
    src = torch.empty(256 * KB * KB // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = min(_time_cpu(lambda: dst.copy_(src), None) for _ in range(5))
    return 2 * src.numel() * 4 / best, "measured memcpy (read + write), not a hardware peak"


def _time_cpu(fn, flush):
    if flush is not None:
        flush.fill_(0.0)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time_cuda(fn, flush):
    flush.zero_()  # evict the cache so short contexts are not served from L2
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def median_time(fn, device, repeats, flush):
    fn()  # warm-up: compiles the Triton kernel, fills allocator caches
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    return statistics.median(timer(fn, flush) for _ in range(repeats))


def flash_decode():
    """flash-attn's KV-cache decode if installed, else None."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None

    def run(q, k, v, lens):
        # flash-attn wants (B, T, H, D); our (B, H, T, D) caches transpose to that without a copy.
        out = flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cache_seqlens=lens)
        return out.transpose(1, 2)

    return run


def main():
    args = parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.contexts:
        contexts = [int(c) for c in args.contexts.split(",")]
    else:
        top = 512 if device.type == "cuda" else 64
        contexts = [c * KB for c in (4, 8, 16, 32, 64, 128, 256, 512) if c <= top]
    default_backends = "streamk,splitk,flash" if device.type == "cuda" else "torch"
    backends = (args.backends or default_backends).split(",")
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    peak, peak_source = peak_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flash = flash_decode()
    flush = torch.empty(256 * KB * KB // 4, dtype=torch.float32, device=device)
    out_file = open(args.out, "a") if args.out else None

    B, Hq, Hkv, D = args.batch, args.q_heads, args.kv_heads, args.head_dim
    for T in contexts:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, Hq, 1, D, generator=g, device=device, dtype=dtype)
        k = torch.randn(B, Hkv, T, D, generator=g, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, T, D, generator=g, device=device, dtype=dtype)
        lens = torch.full((B,), T, dtype=torch.int32, device=device)
        kv_bytes = 2 * k.numel() * k.element_size()

        # No lengths for SDPA: with full caches it may pick its fused kernels.
        runs = {"sdpa": lambda: decode_attention(q, k, v, backend="sdpa")}
        for backend in backends:
            if backend == "flash":
                if flash is not None:
                    runs["flash"] = lambda: flash(q, k, v, lens)
            else:
                runs[backend] = (lambda b: lambda: decode_attention(q, k, v, lens, backend=b))(backend)
        reference = runs["sdpa"]().float()
        times = {b: median_time(fn, device, repeats, flush) for b, fn in runs.items()}
        for backend, seconds in times.items():
            bandwidth = kv_bytes / seconds
            row = {
                "bench": "decode_attention", "device": name, "backend": backend, "peer": "sdpa",
                "batch": B, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "context": T,
                "dtype": str(dtype).replace("torch.", ""), "time_ms": round(seconds * 1e3, 4),
                "kv_bytes": kv_bytes, "bandwidth_GBps": round(bandwidth / 1e9, 2),
                "peak_GBps": round(peak / 1e9, 1) if peak else None,
                "fraction_of_peak": round(bandwidth / peak, 3) if peak else None, "peak_source": peak_source,
                "speedup_vs_sdpa": round(times["sdpa"] / seconds, 3),
                "max_abs_diff_vs_sdpa": float((runs[backend]().float() - reference).abs().max()),
            }
            line = json.dumps(row)
            print(line, flush=True)
            if out_file:
                out_file.write(line + "\n")
        del q, k, v
    if out_file:
        out_file.close()


if __name__ == "__main__":
    main()
