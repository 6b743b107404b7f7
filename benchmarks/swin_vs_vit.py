"""Training throughput of Swin-T and ViT-S/16, each through our Trainer and through a plain torch loop, one run.

Each model is measured by benchmarks/trainer_overhead.py (same weights, same batch, AdamW, rounds
alternating Trainer step / plain step so machine drift cancels), in its own process so one model's
allocations do not slow the other's. Printed: that script's JSON line per model (bench renamed,
peer = the plain loop), then one line comparing the two models (peer = ViT-S/16): img/s ratio through the
Trainer and through the plain loop, and FLOPs per image from each model's flops_per_image().

    python benchmarks/swin_vs_vit.py                      # CPU: 64 px, batch 8, fp32
    python benchmarks/swin_vs_vit.py --device cuda --img-size 224 --batch 128 --precision bf16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {"swin_t": "swin_tiny_patch4_window7_224", "vit_s16": "vit_small_patch16_224"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img-size", type=int, default=64, help="a multiple of 32 (Swin's 4 stages) and of 16 (ViT-S/16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--zero-stage", type=int, default=0)
    return p.parse_args()


def measure(model: str, args: argparse.Namespace) -> dict:
    """trainer_overhead.py's result for one model (its last stdout line is the JSON result)."""
    cmd = [sys.executable, str(HERE / "trainer_overhead.py"), "--model", model, "--img-size", str(args.img_size),
           "--batch", str(args.batch), "--steps", str(args.steps), "--rounds", str(args.rounds),
           "--warmup", str(args.warmup), "--device", args.device, "--precision", args.precision,
           "--zero-stage", str(args.zero_stage)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    args = parse()
    if args.img_size % 32:
        raise SystemExit(f"--img-size {args.img_size}: use a multiple of 32 so both Swin-T and ViT-S/16 tile it")
    import torch

    from distvit import models

    results = {}
    for key, name in MODELS.items():
        r = measure(name, args)
        with torch.device("meta"):
            r["flops_per_image"] = models.create(name, img_size=args.img_size).flops_per_image()
        r["bench"], r["peer"] = "swin_vs_vit", "plain torch loop"
        results[key] = r
        print(json.dumps(r), flush=True)
    swin, vit = results["swin_t"], results["vit_s16"]
    print(json.dumps({
        "bench": "swin_vs_vit", "device": swin["device"], "img_size": args.img_size, "batch": args.batch,
        "precision": args.precision, "zero_stage": args.zero_stage, "model": MODELS["swin_t"], "peer": MODELS["vit_s16"],
        "trainer_img_per_s_ratio_swin_over_vit": swin["ours_img_per_s"] / vit["ours_img_per_s"],
        "plain_img_per_s_ratio_swin_over_vit": swin["plain_img_per_s"] / vit["plain_img_per_s"],
        "flops_ratio_swin_over_vit": swin["flops_per_image"] / vit["flops_per_image"],
        "swin_trainer_over_plain": swin["ratio_ours_over_plain"], "vit_trainer_over_plain": vit["ratio_ours_over_plain"],
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
