"""Shared pieces of the trainer tests: launching real runs and reading what they left on disk."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    from distvit.parallel.mesh import free_port as fp

    return fp()


def run_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(args: list[str], *, nproc: int = 2, launcher: str = "torchrun", env: dict | None = None,
           timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch/train.py under a real launcher; returns the finished process (output captured)."""
    script = str(ROOT / "launch" / "train.py")
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}", script]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", str(nproc), "--master_port", port, script]
    elif launcher == "accelerate":
        # accelerate's --multi_gpu path is torchrun underneath; it runs CPU ranks too.
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", f"--num_processes={nproc}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}", script]
    elif launcher == "distvit":
        cmd = [str(Path(sys.executable).parent / "distvit"), "train"]
    elif launcher == "python":
        cmd = [sys.executable, script]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd + args, cwd=ROOT, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def losses(run_dir: Path) -> list[tuple[int, str]]:
    """(step, loss as written) for every logged step: compared as text, i.e. bitwise."""
    return [(int(r["step"]), r["loss"]) for r in read_metrics(run_dir) if r["loss"]]


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def reference_run(cfg, steps: int, dp_size: int = 2):
    """Plain torch: one process, AdamW, the global batch = every rank's micro-batch concatenated."""
    from distvit.data import build_train_loader
    from distvit.engine.optim import param_groups
    from distvit.engine.schedule import build_scheduler
    from distvit.engine.build import build_model, seed_all

    seed_all(cfg.run.seed)
    model = build_model(cfg)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, foreach=False)
    sched = build_scheduler(opt, total_steps=steps, warmup_steps=cfg.schedule.warmup_steps, kind=cfg.schedule.kind,
                            peak_lr=o.lr, min_lr=cfg.schedule.min_lr)
    iters = []
    for r in range(dp_size):
        loader = build_train_loader(cfg.data, dp_rank=r, dp_size=dp_size, seed=cfg.run.seed)
        loader.set_epoch(0)
        iters.append(iter(loader))
    step_losses = []
    for _ in range(steps):
        xs, ys = zip(*(next(it) for it in iters))
        loss = F.cross_entropy(model(torch.cat(xs)), torch.cat(ys))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_losses.append(loss.item())
    return model.state_dict(), step_losses
