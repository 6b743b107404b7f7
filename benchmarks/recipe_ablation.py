"""Top-1 on the digits demo with each recipe component on / off, at equal steps, through the real trainer.

Each variant is a `launch/train.py` run (torchrun, 2 CPU ranks by default) of configs/demo_digits.yaml
with the same seed, steps and schedule; only the component under test changes. One JSON line per variant
(final and best top-1, wall time) to stdout and to benchmarks/results/recipe_ablation_<device>.jsonl.

    python benchmarks/recipe_ablation.py --data data/digits --steps 600            # CPU, 2 ranks
    python benchmarks/recipe_ablation.py --data data/digits --steps 60 --only plain,full   # a quick look

8x8 digits are not ImageNet: the point is that every component trains through the trainer and what each
does at a fixed budget on this data, not the ImageNet gains (docs/recipes.md has the published numbers).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL = ["data.auto_augment=rand-m9-mstd0.5-inc1", "data.reprob=0.25", "data.mixup=0.8", "data.cutmix=1.0",
        "optim.label_smoothing=0.1", "model.drop_path_rate=0.1"]
VARIANTS = {
    "plain": [],
    "randaugment": FULL[:1],
    "random_erasing": FULL[1:2],
    "mixup_cutmix": FULL[2:4],
    "label_smoothing": FULL[4:5],
    "drop_path": FULL[5:6],
    "full": FULL,
    "full_minus_randaugment": FULL[1:],
    "full_minus_mixup_cutmix": FULL[:2] + FULL[4:],
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/digits", help="digits shards (distvit data write digits --out DIR)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated variant names")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe_ablation_cpu.jsonl"))
    return p.parse_args()


def run(name: str, sets: list[str], args, root: Path) -> dict:
    common = [f"run.output_dir={root}", f"run.name={name}", f"run.max_steps={args.steps}", f"run.seed={args.seed}",
              f"data.train={args.data}/train-*.tar", f"data.val={args.data}/val-*.tar", "data.num_workers=1",
              "log.tensorboard=false", "log.progress=false", "checkpoint.export=false", "model.drop_path_rate=0.0",
              f"schedule.warmup_steps={max(1, args.steps // 20)}", "parallel.precision=fp32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", str(ROOT / "launch/train.py"),
           "--config", "demo_digits"]
    for s in common + sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    summary = json.loads((root / name / "summary.json").read_text())
    return {"bench": "recipe_ablation", "variant": name, "sets": sets, "steps": args.steps, "nproc": args.nproc,
            "final_top1": summary["final_top1"], "best_top1": summary["best_top1"],
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    args = parse()
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, out.open("a") as f:
        for name in names:
            row = run(name, VARIANTS[name], args, Path(tmp))
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
