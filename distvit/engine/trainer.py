"""The training loop: Config in, a trained model, metrics and checkpoints out.

    Trainer(cfg, resume="auto").fit()

Build order (one direction): process groups and mesh -> data loaders (over dp) -> model
(pure nn.Module; sequence-parallel wiring if sp > 1) -> optimizer + schedule -> DeepSpeed engine
(from the generated config) -> optional interleaved offload -> resume. The loop counts optimizer
steps; a micro-batch loop feeds DeepSpeed's gradient accumulation.
"""
from __future__ import annotations

import copy
import errno
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distvit import comm
from distvit import dist as ddist
from distvit import errors, launch_check, models, watchdog
from distvit import offload
from distvit.checkpoint import io as ckio
from distvit.checkpoint import resume as ckresume
from distvit.checkpoint import state as ckstate
from distvit.checkpoint.reshape import is_universal
from distvit.config import Config, ConfigError, save_config
from distvit.data import build_train_loader, build_val_loader, read_manifest
from distvit.data.mixup import build_mixer
from distvit.engine import distill, lr_scale
from distvit.engine.deepspeed_config import build_ds_config, resolve_precision
from distvit.engine.loss import cross_entropy
from distvit.engine.startup import check_output_dir
from distvit.engine.metrics import MetricsWriter, device_peak_tflops, peak_memory_gib
from distvit.engine.optim import build_optimizer, freeze_parameters
from distvit.engine.schedule import build_scheduler
from distvit.engine.step_sync import StepSync
from distvit.engine.step_tuning import grad_norm, takes_over_clipping, tune_engine
from distvit.engine.tasks import NextPatch


class TrainingDiverged(RuntimeError):
    pass


def log0(*args) -> None:
    if ddist.is_main():
        print(*args, flush=True)


def rng_state(device: torch.device) -> tuple[dict, dict]:
    """(JSON scalars, tensors): stored without pickle (distvit/checkpoint/state.py)."""
    return ckstate.rng_state(device)


def set_rng_state(state: tuple[dict, dict], device: torch.device) -> None:
    ckstate.set_rng_state(*state, device)


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


class Trainer:
    def __init__(self, cfg: Config, *, resume: str | None = None):
        self.cfg = cfg
        # First thing: SIGTERM/SIGUSR1 handlers. During start-up they end the process at once (nothing
        # to save yet; a rank waiting for its peers must not linger); once training runs they ask for a
        # checkpoint after the current step. Then the run folder, before the slow part of start-up.
        self._stop_requested = False
        self._started = False
        self._install_signal_handlers()
        check_output_dir(cfg.run_dir, cfg.run.output_dir, cfg.run.name)
        launch_check.check_accelerate_cpu()  # `accelerate launch --cpu --num_processes N` runs 1 process
        watchdog.set_phase("start-up: process-group rendezvous")
        self.info, self.device = ddist.init(cfg.run.device, timeout_s=cfg.run.collective_timeout_s)
        watchdog.set_phase("start-up: building the mesh, data loaders, model and DeepSpeed engine")
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one host share its cores; more threads than cores makes every matmul crawl.
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or self.info.world_size)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
        import deepspeed

        self.mesh = ddist.Mesh.build(cfg.parallel.sp_size)
        self.lr_line = lr_scale.apply(cfg, self.mesh.dp_size)  # optim.lr_base -> optim.lr for this world size
        self.rank = self.mesh.rank
        self.is_main = self.rank == 0
        if not self.is_main:  # the weights loader's notes (e.g. head re-initialised): one line per run, not per rank
            logging.getLogger("distvit.models").setLevel(logging.ERROR)
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        resume = resume if resume is not None else cfg.checkpoint.resume
        self.resume_from = self._resolve_resume(resume)

        # Identical initial weights on every rank (ZeRO-3 partitions whatever each rank built).
        seed_all(cfg.run.seed)
        model = build_model(cfg)
        if cfg.model.freeze:
            log0(f"model.freeze: {freeze_parameters(model, cfg.model.freeze)} parameter tensors frozen")
        if cfg.parallel.activation_checkpointing:
            model.set_grad_checkpointing(True)
        self.flops_per_image = float(model.flops_per_image()) if hasattr(model, "flops_per_image") else None
        self.num_params = sum(p.numel() for p in model.parameters())
        self.task = NextPatch.from_config(cfg)  # None: classification
        if cfg.parallel.sp_size > 1 and self.task is not None:
            self.task.parallelize(model, self.mesh, cfg.parallel.sp_impl)
        elif cfg.parallel.sp_size > 1:
            from distvit.models.parallelize import parallelize_sequence

            # "partial": no gradient all-reduce over sp inside backward; DeepSpeed sums over sp and
            # averages over dp in its one reduction, and ZeRO shards over dp x sp (docs/sequence_parallel.md).
            parallelize_sequence(model, self.mesh, impl=cfg.parallel.sp_impl, grad_sync="partial",
                                 ulysses_size=cfg.parallel.ulysses_size)

        if cfg.run.compile:  # in place: parameter names and DeepSpeed's hooks stay as they are
            model.compile()
        classes = getattr(model, "num_classes", None)  # labels outside the head are bad samples, not IndexError
        self.train_loader = build_train_loader(cfg.data, dp_rank=self.mesh.dp_rank, dp_size=self.mesh.dp_size,
                                               seed=cfg.run.seed, num_classes=classes, device=self.device)
        self.val_loader = (
            build_val_loader(cfg.data, dp_rank=self.mesh.dp_rank, dp_size=self.mesh.dp_size, num_classes=classes,
                             device=self.device)
            if cfg.data.val else None
        )
        accum = cfg.parallel.grad_accum
        self.steps_per_epoch = self.train_loader.steps_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"one epoch has {self.train_loader.steps_per_epoch} micro-batches per rank, fewer than "
                f"parallel.grad_accum={accum}; lower data.batch_size or parallel.grad_accum"
            )
        if cfg.run.max_steps:
            self.total_steps = cfg.run.max_steps
        elif cfg.run.epochs:
            self.total_steps = cfg.run.epochs * self.steps_per_epoch
        else:
            raise ConfigError("set run.epochs or run.max_steps (both are empty)")

        self.precision = resolve_precision(cfg, self.device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ds_config = build_ds_config(cfg, self.device, elements_per_rank=-(-trainable // self.mesh.world_size),
                                    world_size=self.mesh.world_size)
        if self.resume_from is not None and is_universal(self.resume_from):
            # A reshaped checkpoint (`distvit ckpt reshape`): DeepSpeed re-partitions whole tensors.
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        own_clipping = takes_over_clipping(ds_config, cfg.parallel.zero_stage)  # step_tuning.py: cheaper, no sync
        optimizer = build_optimizer(model, cfg, self.device)
        scheduler = build_scheduler(
            optimizer, total_steps=self.total_steps, warmup_steps=cfg.schedule.warmup_steps,
            kind=cfg.schedule.kind, peak_lr=cfg.optim.lr, min_lr=cfg.schedule.min_lr,
            decay_fraction=cfg.schedule.decay_fraction,
        )
        mpu = _deepspeed_mpu(self.mesh)
        if mpu is not None and cfg.parallel.zero_stage == 3:
            # ZeRO-3 x sp: partition over dp x sp, sum gradients over sp (distvit/engine/zero3_sp.py).
            from distvit.engine.zero3_sp import prepare_zero3_sp

            prepare_zero3_sp(model, ds_config, mpu)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu,
        )
        self._clip = tune_engine(self.engine, world_size=self.mesh.world_size, zero_stage=cfg.parallel.zero_stage,
                                 max_norm=cfg.optim.grad_clip, clipping_taken=own_clipping)
        self._step_sync = StepSync(self.device, dp_size=self.mesh.dp_size, sp_rank=self.mesh.sp_rank)
        self.offload = None
        if cfg.parallel.offload == "interleaved":
            self.offload = offload.enable(self.engine, offload.Settings.from_config(cfg.parallel), logger=log0)
        self.ema = self._build_ema(model)
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        # A frozen teacher beside the engine (never wrapped by DeepSpeed), in the student's precision.
        self.distiller = distill.build_distiller(cfg, self.engine.module, self.device, self.input_dtype)
        self.mixer = build_mixer(cfg.data, getattr(self.engine.module, "num_classes", None))  # None without mixup / cutmix

        self.step = 0
        self.epoch = 0
        self.best = {"val_top1": None, "val_top5": None}
        if self.resume_from is not None:
            self._load(self.resume_from)
        self._start_step = self.step
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(
            self.run_dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard,
            resume_step=self.step if self.resume_from is not None else None,
        )
        self.peak_tflops = device_peak_tflops(self.device, cfg.log.peak_tflops)
        self._print_plan(ds_config)
        watchdog.set_phase(lambda: f"training step {self.step + 1}")
        self._started = True

    # ------------------------------------------------------------------ set-up helpers

    def _resolve_resume(self, resume: str | None) -> Path | None:
        self._saved_tags: set[Path] = set()
        self._resume_candidates: list[Path] = []
        if resume:
            if resume == "auto":  # the newest first; _load moves on when one fails to load
                self._resume_candidates = ckio.resume_candidates(self.ckpt_root, log=log0)
                found = self._resume_candidates[0] if self._resume_candidates else None
            else:
                found = ckio.resolve_resume(resume, self.ckpt_root, log=log0)
            if found is None:
                log0(f"--resume {resume}: no complete checkpoint in {self.ckpt_root} yet; starting from scratch")
            return found
        if ckio.list_checkpoints(self.ckpt_root):
            raise ConfigError(
                f"run folder '{self.run_dir}' already holds checkpoints; continue it with --resume auto, "
                f"or start a new run with --set run.name=<new name> (nothing was overwritten)"
            )
        return None

    def _build_ema(self, model: torch.nn.Module):
        decay = self.cfg.optim.ema_decay
        if decay is None:
            return None
        if self.cfg.parallel.zero_stage == 3:
            raise ConfigError(
                "optim.ema_decay needs full weights on every rank, which ZeRO-3 partitions; "
                "use parallel.zero_stage <= 2 or set optim.ema_decay=null"
            )
        ema = copy.deepcopy(self.engine.module).float().eval()
        for p in ema.parameters():
            p.requires_grad_(False)
        return ema

    def _print_plan(self, ds_config: dict) -> None:
        cfg = self.cfg
        global_batch = cfg.data.batch_size * cfg.parallel.grad_accum * self.mesh.dp_size
        tokens = (getattr(getattr(self.engine.module, "patch_embed", None), "num_patches", None)
                  or getattr(self.engine.module, "num_patches", None))
        lines = [
            f"distvit: {cfg.model.name} ({self.num_params / 1e6:.2f}M params) on {self.mesh.world_size} rank(s) "
            f"[{self.info.launcher}], dp={self.mesh.dp_size} sp={self.mesh.sp_size}, device={self.device.type}, "
            f"ZeRO-{cfg.parallel.zero_stage}, {self.precision}, offload={cfg.parallel.offload}",
            f"  global batch {global_batch} = {cfg.data.batch_size} per rank x {cfg.parallel.grad_accum} accum x "
            f"{self.mesh.dp_size} dp; {self.steps_per_epoch} steps/epoch; {self.total_steps} steps in all"
            + (f"; {tokens} tokens/image, {tokens * global_batch} tokens/step" if tokens else ""),
            f"  {self.lr_line}",
        ]
        if self.flops_per_image:
            lines.append(f"  {3 * self.flops_per_image * global_batch / 1e12:.4f} TFLOPs/step (fwd+bwd)")
        if self.distiller is not None:
            lines.append(f"  {self.distiller.describe()}")
        if self.resume_from is not None:
            lines.append(f"  resumed from {self.resume_from} at step {self.step}, epoch {self.epoch}")
        lines.append(f"  run folder: {self.run_dir}")
        log0("\n".join(lines))

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        tag = ckio.tag_for_step(self.step)
        tag_dir = self.ckpt_root / tag
        if (tag_dir in self._saved_tags or tag_dir == self.resume_from) and ckio.is_complete(tag_dir):
            return tag_dir
        ckresume.clear_stale(self, tag_dir, log0)
        try:
            self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, save_latest=False,
                                        client_state={"distvit_step": self.step, "distvit_epoch": self.epoch})
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # the previous checkpoint's size is what this one needs
                prev = ckio.complete_checkpoints(self.ckpt_root)
                need = sum(f.stat().st_size for f in prev[-1].rglob("*") if f.is_file()) if prev else None
                raise ckio.disk_full(tag_dir, need) from None
            raise
        ckstate.save_rank(tag_dir, self.rank, step=self.step, epoch=self.epoch, best=self.best,
                          data=self.train_loader.state_dict(), device=self.device, ema=self.ema)
        self._saved_tags.add(tag_dir)
        _test_fault("crash_in_save", self.step)
        ddist.barrier()
        if self.is_main:
            ckio.mark_complete(tag_dir, {
                "step": self.step, "epoch": self.epoch, "world_size": self.mesh.world_size,
                "dp_size": self.mesh.dp_size, "sp_size": self.mesh.sp_size,
                "zero_stage": self.cfg.parallel.zero_stage, "model": self.cfg.model.name,
                "precision": self.precision, "config": self.cfg.model_dump(mode="json"),
            })
            ckio.prune(self.ckpt_root, self.cfg.checkpoint.keep)
        ddist.barrier()
        return tag_dir

    def _load(self, tag_dir: Path) -> None:
        """Load tag_dir; under --resume auto, fall back to older complete checkpoints (checkpoint/resume.py)."""
        candidates = self._resume_candidates if self._resume_candidates[:1] == [tag_dir] else [tag_dir]
        self.resume_from = ckresume.load_first_good(self, candidates, log0)

    # ------------------------------------------------------------------ loop

    def _install_signal_handlers(self) -> None:
        owner = os.getpid()

        def request_stop(signum, frame):
            if os.getpid() != owner:
                # A forked data worker inherited this handler. USR1 (Slurm signals the whole step)
                # is the trainer's to act on; SIGTERM still ends the worker as it would by default.
                if signum == signal.SIGTERM:
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                return
            errors.note_signal(signum)
            if not self._started and signum == signal.SIGTERM:
                # Start-up (e.g. waiting for a peer): no step to finish, nothing to save. Unwinding
                # releases what is held (the op-build lock is freed in a `finally`). USR1, the
                # scheduler's "checkpoint and requeue" warning, is still honoured after the first step.
                if errors.rank() == 0:
                    print(f"distvit: stopped by signal {signum} during start-up (nothing to save yet)", file=sys.stderr, flush=True)
                raise SystemExit(128 + signum)
            self._stop_requested = True
            log0(f"signal {signum}: saving a checkpoint after this step, then exiting for requeue")

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. under some notebook runners)
                pass

    def _micro_batches(self):
        """Yield micro-batches forever, advancing epochs; the loader resumes mid-epoch by itself."""
        while True:
            self.train_loader.set_epoch(self.epoch)
            # Data loading must not draw from the model's RNG (DataLoader seeds its workers from it
            # when an epoch's iterator is created): the stream drop-path sees then depends only on
            # the step, so a resumed run draws exactly what the uninterrupted one did.
            for batch in _rng_isolated(self.train_loader):
                yield batch
            self.epoch += 1

    def train_step(self, batches) -> dict:
        """One optimizer step. Nothing here waits for the device: the loss stays on it until the next
        read step (`_read_steps`), which checks it for NaN/inf on every rank before any save."""
        engine = self.engine
        micro_losses = []
        images_seen = 0
        for micro in range(self.cfg.parallel.grad_accum):
            images, labels = next(batches)
            images = images.to(self.device, dtype=self.input_dtype, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.mixer is not None:  # soft targets; the same mix on every sp rank of this dp rank
                images, labels = self.mixer(images, labels, self.mixer.draws(self.cfg.run.seed, self.step, micro, self.mesh.dp_rank))
            logits = engine(images)
            if self.task is not None:  # next-patch regression: logits are the predicted patches
                loss = self.task.loss(logits, images, engine.module)
            elif self.distiller is not None:
                loss = self.distiller.loss(images, logits, labels)
            else:
                loss = cross_entropy(logits, labels, label_smoothing=self.cfg.optim.label_smoothing)
            if _fault_armed("nan_loss", self.step + 1):
                loss = loss * float("nan")
            engine.backward(loss)
            if self._clip is not None and engine.is_gradient_accumulation_boundary():
                self._clip()
            engine.step()
            micro_losses.append(loss.detach())
            images_seen += images.shape[0]
        self.step += 1
        self._step_sync.add(self.step, micro_losses)
        if self.ema is not None:
            self._update_ema()
        return {"images": images_seen * self.mesh.dp_size}

    def _read_steps(self):
        """The read step: one fused all-reduce (loss, NaN check, preemption flag, bad samples)."""
        reading = self._step_sync.read(stop_requested=self._stop_requested,
                                       bad_samples=self.train_loader.stats().get("bad_samples", 0))
        if reading.first_bad is not None:
            step, value = reading.first_bad
            raise TrainingDiverged(
                f"loss is {value} at step {step}; stopped without saving, the last good checkpoint is "
                f"{ckio.find_resume(self.ckpt_root, log=lambda *_: None) or 'none (none saved yet)'}; "
                "lower optim.lr, raise schedule.warmup_steps or set optim.grad_clip"
            )
        return reading

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.optim.ema_decay
        src = [p.detach().float() for p in self.engine.module.parameters()]
        dst = list(self.ema.parameters())
        torch._foreach_lerp_(dst, src, 1.0 - decay)

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module | None = None) -> dict:
        """Loss, top-1, top-5 over the whole val set, exact: padded samples are masked out."""
        if self.val_loader is None:
            return {}
        model = self.engine if module is None else module
        model.eval()
        if self.task is not None:  # held-out next-patch MSE (engine/tasks.py)
            result = self.task.evaluate(model, self.engine.module if module is None else module, self.val_loader,
                                        self.device, self.input_dtype if module is None else torch.float32,
                                        self.mesh.dp_group, _rng_isolated(self.val_loader))
            model.train()
            return result
        # One row per head: a distilled student's averaged, class-token and distillation-token heads ("", _cls, _dist).
        net = self.engine.module if module is None else module
        heads = distill.head_names(net)
        totals = torch.zeros(len(heads), 4, dtype=torch.float64, device=self.device)  # loss sum, top1, top5, count
        dtype = self.input_dtype if module is None else torch.float32
        with distill.separate_heads(net):
            for images, labels, valid in _rng_isolated(self.val_loader):
                images = images.to(self.device, dtype=dtype)
                labels, valid = labels.to(self.device), valid.to(self.device)
                outputs = distill.named_logits(model(images))
                for i, head in enumerate(heads):
                    logits = outputs[head]
                    loss = F.cross_entropy(logits, labels, reduction="none")
                    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                    hit = top5 == labels[:, None]
                    totals[i] += torch.stack([
                        (loss * valid).sum(), (hit[:, 0] & valid).sum(), (hit.any(-1) & valid).sum(), valid.sum(),
                    ]).double()
        totals = comm.all_reduce(totals, "sum", self.mesh.dp_group).tolist()  # one host read per evaluation
        model.train()
        count = max(totals[0][3], 1.0)
        result = {}
        for i, head in enumerate(heads):
            result[f"val_loss{head}"] = totals[i][0] / count
            result[f"val_top1{head}"] = 100 * totals[i][1] / count
            result[f"val_top5{head}"] = 100 * totals[i][2] / count
        return {**result, "val_count": int(totals[0][3])}

    def fit(self) -> dict:
        cfg = self.cfg
        # Resumed this run at or past its end: one line, nothing rewritten. A checkpoint from elsewhere
        # (e.g. `distvit ckpt reshape` output) is still saved into this run and exported, as a conversion.
        own = self.resume_from is not None and Path(self.resume_from).resolve().parent == self.ckpt_root.resolve()
        if own and self.step >= self.total_steps:
            limit = f"run.max_steps={cfg.run.max_steps}" if cfg.run.max_steps else f"run.epochs={cfg.run.epochs}"
            log0(f"nothing to train: {self.resume_from} is at step {self.step} and {limit} ends the run at step "
                 f"{self.total_steps}; its results are in {self.run_dir}; raise {limit.split('=')[0]} to train further")
            self.metrics.close()
            return {"status": "finished", "nothing_to_train": True, "steps": self.step, "run_dir": str(self.run_dir)}
        start = time.perf_counter()
        batches = self._micro_batches()
        progress = None
        if self.is_main and cfg.log.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                            file=sys.stdout, mininterval=1.0)
        eval_every = cfg.run.eval_every or self.steps_per_epoch
        images_timed, time_timed, steps_timed = 0, 0.0, 0
        last_eval: dict = {}
        exit_reason = "finished"
        self.engine.train()
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                _test_fault("kill_at_step", self.step)
                out = self.train_step(batches)
                # Read steps (log, eval, save, last): the only steps where the host waits for the device.
                is_last = self.step == self.total_steps
                is_log = self.step % cfg.log.every_steps == 0 or is_last
                is_eval = self.step % eval_every == 0 or is_last
                every = cfg.checkpoint.every_steps
                is_save = bool(every) and self.step % every == 0 and not is_last
                reading = self._read_steps() if (is_log or is_eval or is_save) else None
                images_timed += out["images"]
                time_timed += time.perf_counter() - t0  # includes the read: the device caught up there
                steps_timed += 1
                row = None
                if is_log:
                    row = self._metrics_row(reading, images_timed / max(time_timed, 1e-9), time_timed / steps_timed)
                    images_timed, time_timed, steps_timed = 0, 0.0, 0
                if is_eval:
                    last_eval = self._evaluate_all()
                    row = {**(row or {"step": self.step, "epoch": self.epoch}), **last_eval}
                if row is not None:
                    self.metrics.log(row)
                if progress is not None:
                    progress.update(1)
                    if reading is not None:
                        progress.set_postfix(loss=f"{reading.loss:.4f}", lr=f"{self.engine.get_lr()[0]:.2e}",
                                             **({"top1": f"{last_eval['val_top1']:.1f}"} if "val_top1" in last_eval else {}),
                                             **({"mse": f"{last_eval['val_mse']:.4f}"} if "val_mse" in last_eval else {}))
                if is_save:
                    self.save()
                if reading is not None and reading.stop:
                    exit_reason = "preempted"
                    break
        finally:
            if progress is not None:
                progress.close()
        tag_dir = self.save()
        export = None
        if exit_reason == "finished" and cfg.checkpoint.export:
            export = self.export(tag_dir)
        summary = self._summary(time.perf_counter() - start, last_eval, tag_dir, export, exit_reason)
        self.metrics.close()
        return summary

    def _evaluate_all(self) -> dict:
        result = self.evaluate()
        if self.ema is not None and self.val_loader is not None:
            key = "val_mse" if self.task is not None else "val_top1"
            result[f"ema_{key}"] = self.evaluate(self.ema)[key]
        if "val_top1" in result and (self.best["val_top1"] is None or result["val_top1"] > self.best["val_top1"]):
            self.best = {"val_top1": result["val_top1"], "val_top5": result["val_top5"]}
        return result

    def _metrics_row(self, reading, img_per_s: float, step_time: float) -> dict:
        """A log row: the last step's loss (mean over dp, from the fused read), lr and grad norm read now."""
        tflops = mfu = None
        if self.flops_per_image:
            tflops = 3 * self.flops_per_image * img_per_s / 1e12 / self.mesh.world_size  # per rank
            mfu = tflops / self.peak_tflops if self.peak_tflops else None
        return {
            "step": self.step, "epoch": self.epoch, "loss": reading.loss, "lr": self.engine.get_lr()[0],
            "grad_norm": grad_norm(self.engine, self._clip),
            "img_per_s": img_per_s, "step_time_s": step_time, **self._tokens_per_s(img_per_s), "tflops": tflops, "mfu": mfu,
            "peak_mem_gib": peak_memory_gib(self.device), "bad_samples": reading.bad_samples,
            **offload.stats(self.offload),
        }

    def export(self, tag_dir: Path) -> Path | None:
        """Consolidate the final checkpoint to fp32 safetensors that models.create(..., checkpoint=) loads."""
        from distvit.checkpoint.consolidate import consolidate

        out = self.run_dir / "model.safetensors"
        ddist.barrier()
        if self.is_main:
            consolidate(tag_dir, out, overwrite=True)
        ddist.barrier()
        return out

    def _summary(self, wall_s: float, last_eval: dict, tag_dir: Path, export: Path | None, reason: str) -> dict:
        global_batch = self.cfg.data.batch_size * self.cfg.parallel.grad_accum * self.mesh.dp_size
        summary = {
            "status": reason, "steps": self.step, "epochs": self.step / self.steps_per_epoch, "wall_s": wall_s,
            "img_per_s": self._throughput(global_batch, wall_s),
            **self._tokens_per_s(self._throughput(global_batch, wall_s)),
            **({"final_mse": last_eval["val_mse"]} if "val_mse" in last_eval else {}),
            "final_top1": last_eval.get("val_top1"), "final_top5": last_eval.get("val_top5"),
            "best_top1": self.best["val_top1"], "best_top5": self.best["val_top5"],
            **{f"final_{k[len('val_'):]}": v for k, v in last_eval.items() if k.startswith(("val_loss_", "val_top1_", "val_top5_"))},
            "checkpoint": str(tag_dir), "weights": None if export is None else str(export),
            "run_dir": str(self.run_dir),
        }
        if self.is_main:
            ckio.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def _tokens_per_s(self, img_per_s: float) -> dict:
        """The autoregressive task's throughput in patch tokens (its unit of work, as LLMs count)."""
        if self.task is None:
            return {}
        return {"tokens_per_s": img_per_s * self.task.tokens_per_image(self.engine.module)}

    def _throughput(self, global_batch: int, wall_s: float) -> float:
        return (self.step - self._start_step) * global_batch / max(wall_s, 1e-9)


def _rng_isolated(iterable):
    """Iterate without letting the iterator touch the global torch RNG (see Trainer.train_step)."""
    iterator = None
    while True:
        with torch.random.fork_rng(devices=[]):
            if iterator is None:
                iterator = iter(iterable)
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


def _deepspeed_mpu(mesh: ddist.Mesh):
    """DeepSpeed's view of the mesh: None without sequence parallelism (plain data parallel)."""
    if mesh.sp_size == 1:
        return None
    from distvit.models.parallelize import deepspeed_mpu

    return deepspeed_mpu(mesh, "partial")


def _fault_armed(point: str, step: int) -> bool:
    """Fault injection for the resume tests: DISTVIT_TEST_FAULT=<point>:<step>[:<rank>]."""
    spec = os.environ.get("DISTVIT_TEST_FAULT")
    if not spec:
        return False
    name, at, *rank = spec.split(":")
    return name == point and int(at) == step and (not rank or int(rank[0]) == dist.get_rank())


def _test_fault(point: str, step: int) -> None:
    """SIGKILL this process at the armed point (a real kill -9: no cleanup, no atexit)."""
    if _fault_armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
