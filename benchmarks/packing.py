"""Packed vs padded native-resolution batches at an equal token budget: useful-token fraction,
images per second (forward + backward), peak memory.

Both modes run the same model and code path (`model.forward_packed`, block-diagonal attention):
- padded: one image per sequence row, every row padded to --max-tokens patches (the usual way
  to batch images of mixed sizes without resizing them to one size);
- packed: rows of --max-tokens patches filled with whole images, first fit in input order.
Each step processes --rows rows (the same token budget: rows x max_tokens slots, plus the
class tokens), forward + backward of a cross-entropy loss, no optimizer. The images are the
same list in both modes (random sides in [--min-side, --max-side], multiples of the patch size,
seeded), cut into steps in order; the last partial step is dropped. The two modes' timed steps
are interleaved, and img/s is images per step over the median step time (mean in img_per_s_mean).

Peak memory (CPU): peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
mode's timed steps (glibc mallopt M_MMAP_THRESHOLD = 1 MiB and malloc_trim, so the RSS follows the
live tensors); on CUDA torch.cuda.max_memory_allocated. One JSON line per mode, then a
summary line: speedup = img/s packed / padded; padding_removed = padded's padding fraction minus
packed's; goal: speedup - 1 >= padding_removed - 0.10 (the issue's bar).

    python benchmarks/packing.py                                  # CPU, ViT-S/16, 64..224 px
    python benchmarks/packing.py --device cuda --images 512 --rows 32 --max-side 512
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from distvit import models  # noqa: E402
from distvit.data.packing import pack  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--min-side", type=int, default=64)
    p.add_argument("--max-side", type=int, default=224)
    p.add_argument("--max-tokens", type=int, default=None, help="patches per row (default: the largest image's)")
    p.add_argument("--rows", type=int, default=8, help="rows per step (the token budget)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="attention backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also append the JSON lines to this file")
    return p.parse_args()


def _images(args, patch: int):
    g = torch.Generator().manual_seed(args.seed)
    sides = torch.arange(args.min_side // patch, args.max_side // patch + 1) * patch
    out = []
    for _ in range(args.images):
        h, w = (int(sides[torch.randint(len(sides), (1,), generator=g)]) for _ in range(2))
        out.append(torch.randn(3, h, w, generator=g))
    return out


def _steps(images, patch, max_tokens, rows, per_seq):
    """Consecutive image groups that fill at most `rows` rows; the last partial one is dropped."""
    steps, start = [], 0
    while start < len(images):
        end = start + 1
        while end < len(images) and pack(images[start:end + 1], patch, max_tokens, per_seq).num_sequences <= rows:
            end += 1
        if end == len(images) and pack(images[start:end], patch, max_tokens, per_seq).num_sequences < rows:
            break
        steps.append(pack(images[start:end], patch, max_tokens, per_seq))
        start = end
    return steps


def _rss_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS") * 1024


def _peak(device, base):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return _rss_kib("VmHWM") * 1024 - base


def _step(model, batch, device):
    logits = model.forward_packed(batch)
    torch.nn.functional.cross_entropy(logits, torch.zeros(batch.num_images, dtype=torch.long, device=device)).backward()
    model.zero_grad(set_to_none=True)


def _timed(model, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _step(model, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(model, runs: dict, device) -> dict:
    """Per mode: peak memory over its first two steps (alone), then step times with the modes'
    steps interleaved (so load from other jobs on a shared machine hits both alike)."""
    out = {}
    for mode, batches in runs.items():
        _step(model, batches[0], device)  # warm-up
        base = _reset_peak(device)
        for b in batches[:2]:
            _step(model, b, device)
        out[mode] = dict(peak_mem_mib=_peak(device, base) / 2 ** 20, times=[])
    for i in range(max(len(b) for b in runs.values())):
        for mode, batches in runs.items():
            if i < len(batches):
                out[mode]["times"].append(_timed(model, batches[i], device))
    for mode, batches in runs.items():
        times = out[mode].pop("times")
        images = sum(b.num_images for b in batches)
        real = sum(int(b.seq_lens.sum()) for b in batches)
        slots = sum(b.patches.shape[0] * b.patches.shape[1] for b in batches)
        med = statistics.median(times)
        out[mode].update(steps=len(times), images=images, img_per_s=images / len(batches) / med,
                         img_per_s_mean=images / sum(times), step_s_median=med, useful_fraction=real / slots)
    return out


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: big blocks go back to the OS on free
    model = models.create(args.model, dynamic_img_size=True, attn_backend=args.backend).to(device)
    patch = model.patch_embed.patch_size[0]
    images = _images(args, patch)
    max_tokens = args.max_tokens or max(i.shape[1] * i.shape[2] for i in images) // patch ** 2
    runs = {}
    for mode, per_seq in (("padded", 1), ("packed", None)):
        runs[mode] = [b.to(device) for b in _steps(images, patch, max_tokens, args.rows, per_seq)]
        if len(runs[mode]) < 2:
            sys.exit(f"packing benchmark: --images {args.images} fills fewer than 2 steps of --rows {args.rows} in "
                     f"mode {mode}; raise --images")
    results = measure(model, runs, device)
    lines = [dict(bench="packing", mode=mode, model=args.model, device=str(device), rows=args.rows,
                  max_tokens=max_tokens, sides=[args.min_side, args.max_side], threads=args.threads, **res)
             for mode, res in results.items()]
    padded, packed = lines
    removed = (1 - padded["useful_fraction"]) - (1 - packed["useful_fraction"])
    speedup = packed["img_per_s"] / padded["img_per_s"]
    lines.append(dict(bench="packing", mode="summary", speedup=speedup, padding_removed=removed,
                      ideal_speedup=packed["useful_fraction"] / padded["useful_fraction"],
                      goal_met=speedup - 1 >= removed - 0.10,
                      peak_mem_ratio=packed["peak_mem_mib"] / max(padded["peak_mem_mib"], 1e-9)))
    for line in lines:
        text = json.dumps(line)
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
