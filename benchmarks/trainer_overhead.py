"""Step time of our Trainer (DeepSpeed engine + our step) vs a plain torch loop, same run.

Both sides train the same model from the same weights on the same batch with AdamW, in one
process; data loading is left out of both (the Trainer's `train_step` is fed the same tensors),
so the ratio is the overhead of the engine and our bookkeeping (loss reduction, NaN check, grad
norm, lr schedule). Both sides read their loss on the host every --log-every steps (the trainer's
read step: one fused all-reduce of loss, NaN count and preemption flag, then lr and grad norm, as
`Trainer.fit` does on a log step). Rounds alternate A, B, A, B ... and the ratio is taken per
round, so machine drift cancels. One JSON line per result.

    python benchmarks/trainer_overhead.py                       # CPU, vit_tiny_patch16_224 @ 64px
    python benchmarks/trainer_overhead.py --device cuda --model vit_base_patch16_224 --img-size 224 \
        --batch 128 --precision bf16                            # GPU: also img/s and MFU
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

import torch
import torch.nn.functional as F


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="host reads of the loss, both sides (log.every_steps)")
    p.add_argument("--zero-extra", default=None, metavar="JSON",
                   help='try DeepSpeed ZeRO knobs on our side, e.g. \'{"contiguous_gradients": false}\'')
    p.add_argument("--note", default=None, help="free text stored with the result (machine load, threads)")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    args = parse()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    from distvit.config import load_config
    from distvit.data.write import write_digits
    from distvit.engine.optim import param_groups
    from distvit.engine.build import build_model, seed_all
    from distvit.engine.trainer import Trainer
    from distvit.engine.metrics import device_peak_tflops
    from distvit.engine.step_tuning import grad_norm

    tmp = Path(tempfile.mkdtemp(prefix="distvit-bench-"))
    write_digits(tmp / "digits")  # the Trainer needs shards to build its loaders; batches are fed directly
    cfg = load_config("demo_digits", [
        f"model.name={args.model}", f"model.img_size={args.img_size}", f"data.img_size={args.img_size}", "model.in_chans=3", "data.in_chans=3",
        "model.num_classes=1000",
        f"data.train={tmp}/digits/train-*.tar", "data.val=null", f"data.batch_size={args.batch}",
        f"run.output_dir={tmp}/runs", "run.max_steps=1000000", f"run.device={args.device}",
        f"parallel.zero_stage={args.zero_stage}", f"parallel.precision={args.precision}",
        "log.progress=false", "log.tensorboard=false", "schedule.warmup_steps=0", "schedule.kind=constant",
        f"log.every_steps={args.log_every}",
    ])
    if args.zero_extra:
        import distvit.engine.trainer as trainer_module

        generated = trainer_module.build_ds_config

        def with_extra(*a, **k):
            ds = generated(*a, **k)
            ds["zero_optimization"].update(json.loads(args.zero_extra))
            return ds

        trainer_module.build_ds_config = with_extra
    trainer = Trainer(cfg)
    device = trainer.device
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    seed_all(cfg.run.seed)
    plain = build_model(cfg).to(device)
    plain.load_state_dict({k: v.float() for k, v in trainer.engine.module.state_dict().items()})
    plain_opt = torch.optim.AdamW(param_groups(plain, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps, fused=device.type == "cuda", foreach=None if device.type == "cuda" else False)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    labels = torch.randint(0, 1000, (args.batch,), generator=g)

    def forever():
        while True:
            yield images, labels

    batches = forever()
    x_dev, y_dev = images.to(device), labels.to(device)

    plain_count = [0]

    def plain_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(plain(x_dev).float(), y_dev)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        plain_count[0] += 1
        if plain_count[0] % args.log_every == 0:  # a plain loop logs too
            loss.item(), norm.item(), plain_opt.param_groups[0]["lr"]

    def ours_step():
        trainer.train_step(batches)
        if trainer.step % args.log_every == 0:  # Trainer.fit's log step: fused read, then lr and grad norm
            trainer._read_steps()
            trainer.engine.get_lr(), grad_norm(trainer.engine, trainer._clip)

    def timed(fn, n):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / n

    timed(plain_step, args.warmup)
    timed(ours_step, args.warmup)
    ratios, ours_t, plain_t = [], [], []
    for _ in range(args.rounds):
        a = timed(ours_step, args.steps)
        b = timed(plain_step, args.steps)
        ours_t.append(a)
        plain_t.append(b)
        ratios.append(a / b)
    ours_med, plain_med = statistics.median(ours_t), statistics.median(plain_t)
    result = {
        "bench": "trainer_overhead", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model, "img_size": args.img_size, "batch": args.batch, "precision": args.precision,
        "zero_stage": args.zero_stage, "ours_step_s": ours_med, "plain_step_s": plain_med,
        "ratio_ours_over_plain": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        # On a loaded machine the fastest round of each side is the least disturbed one.
        "ratio_of_fastest_rounds": min(ours_t) / min(plain_t),
        "ours_img_per_s": args.batch / ours_med, "plain_img_per_s": args.batch / plain_med,
        "goal": "ratio <= 1.10" if args.zero_stage == 0 else "ratio <= 1.15", "log_every": args.log_every,
        "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
        **({"zero_extra": json.loads(args.zero_extra)} if args.zero_extra else {}),
        **({"note": args.note} if args.note else {}),
    }
    peak = device_peak_tflops(device)
    if trainer.flops_per_image and peak:
        for side, t in (("ours", ours_med), ("plain", plain_med)):
            result[f"{side}_mfu"] = 3 * trainer.flops_per_image * args.batch / t / 1e12 / peak
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
