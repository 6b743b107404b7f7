"""How long a checkpoint stops training: synchronous save vs `checkpoint.async`, same run.

One Trainer (one CPU rank, DeepSpeed engine, real `Trainer.save`) on a model whose checkpoint
takes seconds to write (ViT-B/16: 86M parameters, ~1 GB of weights and Adam state at ZeRO-0,
fsynced and hashed into the COMPLETE manifest). Data loading is left out (the same batch is fed).
Rounds alternate sync, async, sync, ...; each round times `--steps` plain steps (the baseline:
their median), then a step followed by a save, then (async) steps until the background write is
done, and the wait for it. Two figures per round:

    stall_s   the time the training loop is blocked at the save step: the whole save (sync), the
              snapshot to host memory (async). This is the figure the goal is about.
    extra_s   all the wall time the checkpoint costs against the baseline:
              (save step + save + every step run while the writer ran + the final wait)
              - baseline x steps counted; for async this includes the writer competing with
              training for the CPU (on a 2-core machine shared with other jobs, a lot).

One JSON line per round, then a summary line: the median of each side and the ratios
(goal: async stall <= 20% of sync).

    python benchmarks/checkpoint_stall.py                 # CPU, vit_base_patch16_224 at 32 px
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="baseline steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where checkpoints go (default: a temp folder, removed)")
    p.add_argument("--note", default=None, help="free text stored with the result (machine load)")
    return p.parse_args()


def main() -> int:
    args = parse()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from distvit.checkpoint.manager import CheckpointManager
    from distvit.config import load_config
    from distvit.data.write import write_digits
    from distvit.engine.trainer import Trainer

    tmp = Path(args.out_dir or tempfile.mkdtemp(prefix="distvit-stall-"))
    write_digits(tmp / "digits")
    cfg = load_config("demo_digits", [
        f"model.name={args.model}", f"model.img_size={args.img_size}", f"data.img_size={args.img_size}",
        "model.in_chans=3", "data.in_chans=3", "model.num_classes=1000", "model.drop_path_rate=0.0",
        f"data.train={tmp}/digits/train-*.tar", "data.val=null", f"data.batch_size={args.batch}",
        f"run.output_dir={tmp}/runs", "run.name=stall", "run.max_steps=1000000", "run.device=cpu",
        f"parallel.zero_stage={args.zero_stage}", "parallel.precision=fp32", "checkpoint.keep=1",
        "log.progress=false", "log.tensorboard=false", "schedule.warmup_steps=0", "schedule.kind=constant",
    ])
    trainer = Trainer(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    labels = torch.randint(0, 1000, (args.batch,), generator=g)

    def forever():
        while True:
            yield images, labels

    batches = forever()

    def step() -> float:
        t0 = time.perf_counter()
        trainer.train_step(batches)
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up: allocator, DeepSpeed's first-step work
        step()
    results = {"sync": [], "async": []}
    ckpt_bytes = None
    for round_ in range(args.rounds * 2):
        side = "sync" if round_ % 2 == 0 else "async"
        trainer.checkpoints = CheckpointManager(trainer, is_async=side == "async")
        base = statistics.median(step() for _ in range(args.steps))
        t0 = time.perf_counter()
        trainer.train_step(batches)
        t_save = time.perf_counter()
        tag = trainer.save()
        save_call = time.perf_counter() - t_save
        counted = 1
        while trainer.checkpoints.writing():
            step()
            counted += 1
        trainer.checkpoints.finish()
        total = time.perf_counter() - t0
        ckpt_bytes = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
        row = {"bench": "checkpoint_stall", "side": side, "round": round_ // 2, "model": args.model,
               "params_m": round(trainer.num_params / 1e6, 1), "zero_stage": args.zero_stage,
               "checkpoint_mb": round(ckpt_bytes / 1e6), "baseline_step_s": round(base, 4),
               "stall_s": round(save_call, 3), "steps_during_write": counted - 1,
               "extra_s": round(total - counted * base, 3), "load_1min": round(os.getloadavg()[0], 1)}
        results[side].append((row["stall_s"], row["extra_s"]))
        print(json.dumps(row), flush=True)
    med = {side: [statistics.median(r[i] for r in rows) for i in (0, 1)] for side, rows in results.items()}
    print(json.dumps({
        "bench": "checkpoint_stall", "summary": True, "model": args.model, "zero_stage": args.zero_stage,
        "checkpoint_mb": round(ckpt_bytes / 1e6), "peer": "sync save (same run)",
        "sync_stall_s": med["sync"][0], "async_stall_s": med["async"][0],
        "ratio_stall_async_over_sync": round(med["async"][0] / med["sync"][0], 3),
        "sync_extra_s": med["sync"][1], "async_extra_s": med["async"][1],
        "ratio_extra_async_over_sync": round(med["async"][1] / med["sync"][1], 3) if med["sync"][1] > 0 else None,
        "goal": "stall ratio <= 0.20", "rounds": args.rounds, "threads": torch.get_num_threads(),
        "load_1min": round(os.getloadavg()[0], 1), "note": args.note,
    }), flush=True)
    if args.out_dir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
