"""From a Config to the parts the Trainer runs, in one direction:

    model (pure nn.Module) -> sequence-parallel wiring (distvit.parallel) -> data loaders (over dp)
    -> optimizer + schedule -> DeepSpeed engine (from the generated config) -> interleaved offload,
    EMA, distillation teacher, mixup

build() returns them as one Parts record; the Trainer keeps the loop, eval, metrics and
checkpoints. Tests and benchmarks build reference models with the same build_model/seed_all.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from distvit import models
from distvit import offload as offload_api
from distvit.checkpoint.reshape import is_universal
from distvit.config import Config, ConfigError
from distvit.data import build_train_loader, build_val_loader, read_manifest
from distvit.data.mixup import build_mixer
from distvit.engine import distill, packed_train
from distvit.engine.optim import build_optimizer, freeze_parameters
from distvit.engine.schedule import build_scheduler
from distvit.engine.step_sync import StepSync
from distvit.engine.step_tuning import takes_over_clipping, tune_engine
from distvit.engine.tasks import NextPatch
from distvit.parallel import mesh as ddist
from distvit.parallel.mesh import log0
from distvit.parallel.deepspeed_config import build_ds_config, resolve_precision
from distvit.parallel.engine import apply_sequence_parallel, init_engine


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config) -> torch.nn.Module:
    """The model the config names, sized for its data (classes from the shards' manifest)."""
    task = NextPatch.from_config(cfg)
    if task is not None:  # task.kind=autoregressive: a causal model, no classifier (engine/tasks.py)
        return task.build_model(cfg)
    manifest = read_manifest(cfg.data.train)
    num_classes = cfg.model.num_classes or (manifest or {}).get("num_classes")
    overrides = dict(
        img_size=cfg.model.img_size or cfg.data.img_size,
        in_chans=cfg.model.in_chans or cfg.data.in_chans,
        drop_path_rate=cfg.model.drop_path_rate,
        attn_backend=cfg.model.attn_backend,
    )
    if num_classes:
        overrides["num_classes"] = num_classes
    return models.create(cfg.model.name, checkpoint=cfg.model.checkpoint, reset_head=cfg.model.reset_head, **overrides)


def build_ema(cfg: Config, module: torch.nn.Module) -> torch.nn.Module | None:
    """An fp32 copy of the weights the step lerps toward (optim.ema_decay), or None. ZeRO 0-2 only: the config
    refuses ema_decay under ZeRO-3 (config/checks.py check_run), whose weights are partitioned."""
    if cfg.optim.ema_decay is None:
        return None
    ema = copy.deepcopy(module).float().eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@dataclass
class Parts:
    """What build() makes; the Trainer takes each field as an attribute of the same name."""
    engine: Any  # deepspeed.DeepSpeedEngine
    train_loader: Any
    val_loader: Any | None
    steps_per_epoch: int
    total_steps: int
    precision: str
    input_dtype: torch.dtype
    ds_config: dict
    flops_per_image: float | None
    num_params: int
    _clip: Callable | None  # our own gradient clipping (step_tuning.py), when it replaces DeepSpeed's
    _step_sync: StepSync
    offload: Any | None
    ema: torch.nn.Module | None
    distiller: Any | None
    mixer: Any | None


def build(cfg: Config, mesh: ddist.Mesh, device: torch.device, resume_from: Path | None) -> Parts:
    """The Trainer's parts for a resolved config (config/resolve.py has refused what this launch cannot run)."""
    model, mpu, flops_per_image, num_params = _model(cfg, mesh)
    train_loader, val_loader, steps_per_epoch, total_steps = _loaders(cfg, mesh, device, model)
    precision = resolve_precision(cfg, device)
    engine, ds_config, clip = _engine(cfg, mesh, device, model, mpu, total_steps, resume_from)
    step_sync = StepSync(device, dp_size=mesh.dp_size, sp_rank=mesh.sp_rank)
    offload = None
    if cfg.parallel.offload == "interleaved":
        offload = offload_api.enable(engine, offload_api.Settings.from_config(cfg.parallel), logger=log0)
    ema = build_ema(cfg, engine.module)
    input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # A frozen teacher beside the engine (never wrapped by DeepSpeed), in the student's precision.
    distiller = distill.build_distiller(cfg, engine.module, device, input_dtype)
    mixer = build_mixer(cfg.data, getattr(engine.module, "num_classes", None))  # None without mixup / cutmix

    return Parts(engine=engine, train_loader=train_loader, val_loader=val_loader, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, precision=precision, input_dtype=input_dtype, ds_config=ds_config,
                 flops_per_image=flops_per_image, num_params=num_params, _clip=clip, _step_sync=step_sync,
                 offload=offload, ema=ema, distiller=distiller, mixer=mixer)


def _model(cfg: Config, mesh: ddist.Mesh) -> tuple[torch.nn.Module, Any, float | None, int]:
    """(model with sequence-parallel wiring, its DeepSpeed mpu, forward FLOPs per image, parameters)."""
    # Identical initial weights on every rank (ZeRO-3 partitions whatever each rank built).
    seed_all(cfg.run.seed)
    model = build_model(cfg)
    if cfg.model.freeze:
        log0(f"model.freeze: {freeze_parameters(model, cfg.model.freeze)} parameter tensors frozen")
    if cfg.parallel.activation_checkpointing:
        model.set_grad_checkpointing(True)
    flops_per_image = float(model.flops_per_image()) if hasattr(model, "flops_per_image") else None
    num_params = sum(p.numel() for p in model.parameters())
    mpu = apply_sequence_parallel(model, mesh, cfg.parallel.sp_impl, ulysses_size=cfg.parallel.ulysses_size)

    if cfg.run.compile:  # in place: parameter names and DeepSpeed's hooks stay as they are
        model.compile()
    return model, mpu, flops_per_image, num_params


def _loaders(cfg: Config, mesh: ddist.Mesh, device: torch.device, model: torch.nn.Module):
    """(train loader, val loader or None, optimizer steps per epoch, total optimizer steps), split over dp."""
    classes = getattr(model, "num_classes", None)  # labels outside the head are bad samples, not IndexError
    patch = packed_train.patch_size(model)  # data.packing: PackedBatch micro-batches (engine/packed_train.py)
    train_loader = build_train_loader(cfg.data, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size,
                                      seed=cfg.run.seed, num_classes=classes, device=device, patch_size=patch)
    val_loader = (
        build_val_loader(cfg.data, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size, num_classes=classes,
                         device=device, patch_size=patch)
        if cfg.data.val else None
    )
    accum = cfg.parallel.grad_accum
    steps_per_epoch = train_loader.steps_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"one epoch has {train_loader.steps_per_epoch} micro-batches per rank, fewer than "
            f"parallel.grad_accum={accum}; lower data.batch_size or parallel.grad_accum"
        )
    # run.epochs or run.max_steps is set (config/checks.py check_run); max_steps wins.
    total_steps = cfg.run.max_steps or cfg.run.epochs * steps_per_epoch
    return train_loader, val_loader, steps_per_epoch, total_steps


def _engine(cfg: Config, mesh: ddist.Mesh, device: torch.device, model: torch.nn.Module, mpu, total_steps: int,
            resume_from: Path | None):
    """(DeepSpeed engine over our optimizer and schedule, its generated config, our clipping or None)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds_config = build_ds_config(cfg, device, elements_per_rank=-(-trainable // mesh.world_size),
                                world_size=mesh.world_size)
    if resume_from is not None and is_universal(resume_from):
        # A reshaped checkpoint (`distvit ckpt reshape`): DeepSpeed re-partitions whole tensors.
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    own_clipping = takes_over_clipping(ds_config, cfg.parallel.zero_stage)  # step_tuning.py: cheaper, no sync
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(
        optimizer, total_steps=total_steps, warmup_steps=cfg.schedule.warmup_steps,
        kind=cfg.schedule.kind, peak_lr=cfg.optim.lr, min_lr=cfg.schedule.min_lr,
        decay_fraction=cfg.schedule.decay_fraction,
    )
    engine = init_engine(model, optimizer, scheduler, ds_config, mpu, cfg.parallel.zero_stage)
    clip = tune_engine(engine, world_size=mesh.world_size, zero_stage=cfg.parallel.zero_stage,
                       max_norm=cfg.optim.grad_clip, clipping_taken=own_clipping)
    return engine, ds_config, clip
