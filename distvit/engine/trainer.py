"""The training loop: Config in, a trained model, metrics and checkpoints out.

    Trainer(cfg, resume="auto").fit()

Build order (one direction): the config resolved for the launch (config/resolve.py; before any process
group) -> process groups and mesh -> data loaders (over dp) -> model
(pure nn.Module; sequence-parallel wiring if sp > 1) -> optimizer + schedule -> DeepSpeed engine
(from the generated config) -> optional interleaved offload -> resume. The loop counts optimizer
steps; a micro-batch loop feeds DeepSpeed's gradient accumulation.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from distvit import launch_check, watchdog
from distvit.checkpoint import io as ckio
from distvit.checkpoint.manager import CheckpointManager
from distvit.config import Config, save_config
from distvit.config.resolve import for_launch
from distvit.engine import faults, packed_train, report
from distvit.engine.build import Parts, build
from distvit.engine.evaluation import evaluate_classifier
from distvit.engine.loss import cross_entropy
from distvit.engine.signals import StopSignals
from distvit.engine.tasks import NextPatch
from distvit.engine.metrics import MetricsWriter, device_peak_tflops
from distvit.engine.startup import check_output_dir
from distvit.parallel import mesh as ddist
from distvit.parallel.mesh import log0


class TrainingDiverged(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: Config, *, resume: str | None = None):
        # First thing: SIGTERM/SIGUSR1 handlers. During start-up they end the process at once (nothing
        # to save yet; a rank waiting for its peers must not linger); once training runs they ask for a
        # checkpoint after the current step. Then the run folder, before the slow part of start-up.
        self.signals = StopSignals()
        check_output_dir(cfg.run_dir, cfg.run.output_dir, cfg.run.name)
        launch_check.check_accelerate_cpu()  # `accelerate launch --cpu --num_processes N` runs 1 process
        # The config as this run uses it (precision, lr from optim.lr_base), every rule on the world size and
        # device checked: resolved once from the launcher's environment, before any process group; read everywhere.
        cfg, self.lr_line, _ = for_launch(cfg)
        self.cfg = cfg
        watchdog.set_phase("start-up: process-group rendezvous")
        self.info, self.device = ddist.init(cfg.run.device, timeout_s=cfg.run.collective_timeout_s)
        watchdog.set_phase("start-up: building the mesh, data loaders, model and DeepSpeed engine")
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one host share its cores; more threads than cores makes every matmul crawl.
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or self.info.world_size)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
        self.mesh = ddist.Mesh.build(cfg.parallel.sp_size)
        self.rank = self.mesh.rank
        self.is_main = self.rank == 0
        if not self.is_main:  # the weights loader's notes (e.g. head re-initialised): one line per run, not per rank
            logging.getLogger("distvit.models").setLevel(logging.ERROR)
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        resume = resume if resume is not None else cfg.checkpoint.resume
        self.checkpoints = CheckpointManager(self)
        self.resume_from = self.checkpoints.resolve(resume)

        parts = build(cfg, self.mesh, self.device, self.resume_from)
        for name in Parts.__dataclass_fields__:  # self.engine, self.train_loader, ...: build.Parts
            setattr(self, name, getattr(parts, name))
        self._images_done = 0  # images trained on since this process started (all dp ranks)
        self.task = NextPatch.from_config(cfg)  # None: classification (engine/tasks.py)
        self.checkpoints.attach()  # checkpoint.async: snapshots through the engine built above

        self.step = 0
        self.epoch = 0
        self.best = {"val_top1": None, "val_top5": None}
        if self.resume_from is not None:
            self.resume_from = self.checkpoints.load(self.resume_from)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(
            self.run_dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard,
            resume_step=self.step if self.resume_from is not None else None,
        )
        self.peak_tflops = device_peak_tflops(self.device, cfg.log.peak_tflops)
        log0(report.run_plan(self))
        watchdog.set_phase(lambda: f"training step {self.step + 1}")
        self.signals.started = True

    def save(self) -> Path:
        """Save a checkpoint at this step (in the background with checkpoint.async: checkpoint/manager.py)."""
        return self.checkpoints.save()

    # ------------------------------------------------------------------ loop

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
        images_seen, flops = 0, 0.0
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
            loss = packed_train.weighted(loss, images, labels, self.mesh.dp_size)  # packed: mean over the step
            if faults.armed("nan_loss", self.step + 1):
                loss = loss * float("nan")
            engine.backward(loss)
            if self._clip is not None and engine.is_gradient_accumulation_boundary():
                self._clip()
            engine.step()
            micro_losses.append(loss.detach())
            n, f = packed_train.step_counts(images, labels, self.mesh.dp_size, engine.module, self.flops_per_image)
            images_seen, flops = images_seen + n, None if f is None or flops is None else flops + f
        self.step += 1
        self._images_done += images_seen
        self._step_sync.add(self.step, micro_losses)
        if self.ema is not None:
            self._update_ema()
        return {"images": images_seen, "flops": flops}

    def _read_steps(self):
        """The read step: one fused all-reduce (loss, NaN check, preemption flag, bad samples)."""
        reading = self._step_sync.read(stop_requested=self.signals.requested,
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

    def evaluate(self, module: torch.nn.Module | None = None) -> dict:
        """Loss, top-1, top-5 over the whole val set (exact), of the engine or of `module` (the EMA)."""
        if self.val_loader is None:
            return {}
        net, bare = (self.engine, self.engine.module) if module is None else (module, module)
        dtype = self.input_dtype if module is None else torch.float32
        if self.task is not None:  # held-out next-patch MSE (engine/tasks.py)
            return self.task.evaluate(net, bare, self.val_loader, self.device, dtype, self.mesh.dp_group,
                                      _rng_isolated(self.val_loader))
        return evaluate_classifier(net, bare, _rng_isolated(self.val_loader), device=self.device, dtype=dtype,
                                   dp_group=self.mesh.dp_group)

    def fit(self) -> dict:
        """Train to run.max_steps / run.epochs or a stop signal, save, export; returns the summary."""
        done = self._nothing_to_train()
        if done is not None:
            return done
        start = time.perf_counter()
        batches = self._micro_batches()
        progress = None
        if self.is_main and self.cfg.log.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                            file=sys.stdout, mininterval=1.0)
        self._window, self._last_eval, exit_reason = _Window(), {}, "finished"
        self.engine.train()
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                faults.maybe_kill("kill_at_step", self.step)
                out = self.train_step(batches)
                reading = self._after_step(out, t0, progress)
                if reading is not None and reading.stop:
                    exit_reason = "preempted"
                    break
        finally:
            if progress is not None:
                progress.close()
        tag_dir = self.save()
        self.checkpoints.finish()  # async: the last write is durable and `latest` before the export reads it
        export = self.checkpoints.export(tag_dir) if exit_reason == "finished" and self.cfg.checkpoint.export else None
        summary = report.summary(self, time.perf_counter() - start, self._last_eval, tag_dir, export, exit_reason)
        self.metrics.close()
        return summary

    def _nothing_to_train(self) -> dict | None:
        """Resumed this run at or past its end: one line, nothing rewritten, the summary; else None. A checkpoint
        from elsewhere (e.g. `distvit ckpt reshape` output) is still saved into this run and exported, as a conversion."""
        own = self.resume_from is not None and Path(self.resume_from).resolve().parent == self.ckpt_root.resolve()
        if not own or self.step < self.total_steps:
            return None
        run = self.cfg.run
        limit = f"run.max_steps={run.max_steps}" if run.max_steps else f"run.epochs={run.epochs}"
        log0(f"nothing to train: {self.resume_from} is at step {self.step} and {limit} ends the run at step "
             f"{self.total_steps}; its results are in {self.run_dir}; raise {limit.split('=')[0]} to train further")
        self.metrics.close()
        return {"status": "finished", "nothing_to_train": True, "steps": self.step, "run_dir": str(self.run_dir)}

    def _after_step(self, out: dict, t0: float, progress):
        """After a step: on read steps (log, eval, save, last), the only steps where the host waits for the
        device, read it; then the metrics row, eval, progress bar and save. Returns the reading (None: none)."""
        cfg = self.cfg
        is_last = self.step == self.total_steps
        is_log = self.step % cfg.log.every_steps == 0 or is_last
        is_eval = self.step % (cfg.run.eval_every or self.steps_per_epoch) == 0 or is_last
        is_save = bool(cfg.checkpoint.every_steps) and self.step % cfg.checkpoint.every_steps == 0 and not is_last
        reading = self._read_steps() if (is_log or is_eval or is_save) else None
        self._window = self._window.add(out, time.perf_counter() - t0)  # includes the read: the device caught up
        row = None
        if is_log:
            row = report.metrics_row(self, reading, *self._window.rates())
            self._window = _Window()
        if is_eval:
            self._last_eval = self._evaluate_all()
            row = {**(row or {"step": self.step, "epoch": self.epoch}), **self._last_eval}
        if row is not None:
            self.metrics.log(row)
        if progress is not None:
            progress.update(1)
            if reading is not None:
                last = self._last_eval
                progress.set_postfix(loss=f"{reading.loss:.4f}", lr=f"{self.engine.get_lr()[0]:.2e}",
                                     **({"top1": f"{last['val_top1']:.1f}"} if "val_top1" in last else {}),
                                     **({"mse": f"{last['val_mse']:.4f}"} if "val_mse" in last else {}))
        if is_save:
            self.save()
        return reading

    def _evaluate_all(self) -> dict:
        result = self.evaluate()
        if self.ema is not None and self.val_loader is not None:
            key = "val_mse" if self.task is not None else "val_top1"
            result[f"ema_{key}"] = self.evaluate(self.ema)[key]
        if "val_top1" in result and (self.best["val_top1"] is None or result["val_top1"] > self.best["val_top1"]):
            self.best = {"val_top1": result["val_top1"], "val_top5": result["val_top5"]}
        return result


class _Window(NamedTuple):
    """Images, seconds, steps and FLOPs since the last metrics row (FLOPs None once a step's are unknown)."""
    images: int = 0
    seconds: float = 0.0
    steps: int = 0
    flops: float | None = 0.0

    def add(self, out: dict, seconds: float) -> "_Window":
        flops = None if out["flops"] is None or self.flops is None else self.flops + out["flops"]
        return _Window(self.images + out["images"], self.seconds + seconds, self.steps + 1, flops)

    def rates(self) -> tuple[float, float, float | None]:
        """(images/s, s/step, FLOP/s) over the window."""
        per_s = max(self.seconds, 1e-9)
        return self.images / per_s, self.seconds / self.steps, None if self.flops is None else self.flops / per_s


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
