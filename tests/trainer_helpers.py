"""Shared pieces of the trainer tests: launching real runs, reading what they left on disk, and the one
single-process reference loop (`reference_run`) every Trainer-equals-torch test compares against."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

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


def reference_run(cfg, steps: int, dp_size: int = 2, *, teacher=None, total_steps: int | None = None,
                  start_step: int = 0, epoch: int = 0, setup=None, data_state: dict | None = None,
                  reshapes: list[tuple[int, int]] = (), carry_data: bool = True, on_batch=None, on_phase_end=None):
    """The one plain-torch reference loop the Trainer is compared against: one process, no DeepSpeed.

    Each step takes parallel.grad_accum micro-batches from each of dp_size loaders (the ones the ranks
    would read) and backpropagates each micro-batch's loss / (accum * dp_size): DeepSpeed's gradient,
    the mean over ranks of the accumulated micro-batch gradients / accum. The loss is the Trainer's:
    under task.kind=autoregressive the task's (distvit.engine.tasks.NextPatch: next-patch MSE on the
    images), else distvit.engine.loss's cross_entropy with optim.label_smoothing (soft targets under
    data.mixup / cutmix, mixed with the draws the Trainer keys by step, micro-batch and dp rank), or
    distillation_loss against `teacher` (a frozen model) with cfg.distill's kind, alpha and tau. Then
    clipping (optim.clip_mode: the global norm, or each element), torch AdamW (foreach=False) over the
    weight-decay or layer-decay groups, the lr schedule.

    total_steps: the schedule's length (default: every step this call takes); start_step: schedule
    steps already taken; epoch: the loaders' epoch; setup(model, opt): called before the first step
    (e.g. to load weights and Adam moments); data_state: a loader state every loader resumes from
    (e.g. the rest of an epoch a reshaped checkpoint carries, data/remap.py). model.freeze is applied.

    reshapes: [(dp size, steps), ...] phases that follow the first (dp_size, steps) one, as an elastic
    resume on another world size does: each phase's loaders resume from the previous phase's loader
    states re-split (data/remap.py's reshaped_state), or with carry_data=False from the epoch's start
    (what reshape did before it carried the cursor). on_batch(dp_rank, x, y): called with each batch as
    a loader gives it (before mixup), ranks in order; on_phase_end(states): with each phase's loader
    states at its end (JSON-round-tripped, as a checkpoint keeps them).
    Returns (state dict, per-step losses).
    """
    import json

    from distvit.data import build_train_loader, remap
    from distvit.data.mixup import build_mixer
    from distvit.engine.loss import cross_entropy, distillation_loss
    from distvit.engine.optim import freeze_parameters, layer_decay_groups, param_groups
    from distvit.engine.schedule import build_scheduler
    from distvit.engine.tasks import NextPatch
    from distvit.engine.build import build_model, seed_all

    o = cfg.optim
    assert o.name == "adamw", f"the reference loop runs AdamW, not optim.name={o.name}"
    phases = [(dp_size, steps), *reshapes]
    seed_all(cfg.run.seed)
    model = build_model(cfg)
    task = NextPatch.from_config(cfg)  # None: classification
    if cfg.model.freeze:
        freeze_parameters(model, cfg.model.freeze)
    if teacher is not None and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    groups = (layer_decay_groups(model, o.weight_decay, o.lr, o.layer_decay) if o.layer_decay is not None
              else param_groups(model, o.weight_decay))
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=False)
    sched = build_scheduler(opt, total_steps=total_steps or sum(n for _, n in phases),
                            warmup_steps=cfg.schedule.warmup_steps, kind=cfg.schedule.kind, peak_lr=o.lr,
                            min_lr=cfg.schedule.min_lr, decay_fraction=cfg.schedule.decay_fraction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose
        for _ in range(start_step):
            sched.step()
    if setup is not None:
        setup(model, opt)
    mixer = build_mixer(cfg.data, getattr(model, "num_classes", None))
    accum = cfg.parallel.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]
    step_losses, first, carried = [], start_step, None
    for phase, (dp, n_steps) in enumerate(phases):
        loaders = []
        for r in range(dp):
            loader = build_train_loader(cfg.data, dp_rank=r, dp_size=dp, seed=cfg.run.seed)
            if phase == 0 and data_state is not None:
                loader.load_state_dict(data_state)
                assert loader.epoch == epoch and loader.stats()["step_in_epoch"] == 0
            elif carried is not None and carry_data:
                loader.load_state_dict(carried)
            loader.set_epoch(epoch)
            loaders.append(loader)
        iters = [iter(lo) for lo in loaders]
        for step in range(first, first + n_steps):
            total = 0.0
            for micro in range(accum):
                for r in range(dp):
                    x, y = next(iters[r])
                    if on_batch is not None:
                        on_batch(r, x, y)
                    if mixer is not None:
                        x, y = mixer(x.clone(), y, mixer.draws(cfg.run.seed, step, micro, r))
                    out = model(x)
                    if task is not None:
                        loss = task.loss(out, x, model)
                    elif teacher is None:
                        loss = cross_entropy(out, y, o.label_smoothing)
                    else:
                        with torch.no_grad():
                            teacher_logits = teacher(x)
                        cls_logits, dist_logits = out if isinstance(out, tuple) else (out, out)
                        loss = distillation_loss(cls_logits, dist_logits, teacher_logits, y, kind=cfg.distill.kind,
                                                 alpha=cfg.distill.alpha, tau=cfg.distill.tau,
                                                 label_smoothing=o.label_smoothing)
                    (loss / (accum * dp)).backward()
                    total += loss.item() / (accum * dp)
            if o.grad_clip is not None and o.clip_mode == "value":
                for p in params:
                    if p.grad is not None:
                        p.grad.clamp_(-o.grad_clip, o.grad_clip)
            elif o.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step_losses.append(total)
        first += n_steps
        if on_phase_end is None and phase + 1 == len(phases):
            continue  # nobody reads the last states
        states = [json.loads(json.dumps(lo.state_dict())) for lo in loaders]
        del iters
        if on_phase_end is not None:
            on_phase_end(states)
        carried = remap.reshaped_state(states)
    return model.state_dict(), step_losses


def rank_processes(run_name: str) -> list:
    """The training ranks (launch/train.py) of run `run_name` that are alive, launchers left out."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "launch/train.py" in cmd and f"run.name={run_name}" in cmd and "torch.distributed.run" not in cmd \
                and "torchrun" not in cmd:
            found.append(p)
    return found
