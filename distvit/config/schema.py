"""The config's schema: one pydantic section per concern, `extra="forbid"`, every one-key rule
as a validator. The data section belongs to the data package (distvit.data.config.DataConfig);
allowed values come from distvit.choices. Loading, overrides and error texts: load.py; rules
across sections: checks.py; the public face: distvit.config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from distvit.choices import (ATTENTION_BACKENDS, CLIP_MODES, DEVICES, DISTILL_KINDS, LR_BASE_SCALES, OFFLOAD_MODES,
                             OPTIMIZERS, PRECISIONS, SCHEDULES, SP_IMPLS, TASKS, ZERO_STAGES, bounded)
from distvit.data.config import DataConfig
from distvit.errors import UserError
from distvit.offload import Settings as OffloadSettings

STEPS_OR_NULL = bounded(ge=1, hint="or null", note="a run needs at least one step")


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message is one line meant for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = "default"
    output_dir: str = "runs"  # the run folder is output_dir/name
    seed: int = 0
    # Train for this many epochs, or stop at this many optimizer steps (max_steps wins when both are set).
    epochs: Annotated[int | None, STEPS_OR_NULL] = 1
    max_steps: Annotated[int | None, STEPS_OR_NULL] = None
    # Optimizer steps between evaluations; 0: at each epoch end (and always at the end).
    eval_every: Annotated[int, bounded(ge=0, hint="(0: evaluate at each epoch end)")] = 0
    device: Literal[DEVICES] = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    compile: bool = False  # torch.compile the model (inductor); see docs/recipes.md for the cost on CPU
    # A rendezvous or collective that waits longer than this for a peer (stopped, hung, killed)
    # ends every rank with an error naming the missing ranks (distvit/watchdog.py).
    collective_timeout_s: Annotated[float, bounded(gt=0, hint="seconds")] = 300.0


class ModelConfig(Section):
    name: str = "vit_digits"
    num_classes: int | None = None  # None: from the dataset manifest, else the model's default
    img_size: int | None = None  # None: data.img_size
    in_chans: int | None = None  # None: data.in_chans
    drop_path_rate: Annotated[float, bounded(ge=0, lt=1)] = 0.0
    attn_backend: Literal[ATTENTION_BACKENDS] = "auto"
    checkpoint: str | None = None  # initial weights (.safetensors / .pt), e.g. timm's
    freeze: list[str] = []  # fnmatch patterns of parameter names to freeze, e.g. ["patch_embed.*", "blocks.[0-5].*"]
    # Fine-tuning: re-initialise the checkpoint's classifier. null: only when its class count differs
    # from num_classes (said in one line); true: always; false: never (a misfit is an error).
    reset_head: bool | None = None


class OptimConfig(Section):
    name: Literal[OPTIMIZERS] = "adamw"
    lr: Annotated[float, bounded(gt=0)] = 1e-3  # peak learning rate
    # ... or the peak LR at a reference global batch, scaled to the run's (timm's --lr-base;
    # distvit/config/resolve.py): lr = lr_base * (global_batch / lr_base_size), or its sqrt.
    lr_base: float | None = None
    lr_base_size: int = 256
    lr_base_scale: Literal[LR_BASE_SCALES] = "linear"
    weight_decay: Annotated[float, bounded(ge=0)] = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: Annotated[float, bounded(gt=0)] = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm (or max |element|, clip_mode=value); null: off
    clip_mode: Literal[CLIP_MODES] = "norm"
    layer_decay: float | None = None  # lr scale per block, layer_decay ** (layers above); e.g. 0.65 (MAE/BEiT)
    momentum: float = 0.9  # sgd only (Nesterov)
    label_smoothing: Annotated[float, bounded(ge=0)] = 0.0
    ema_decay: float | None = None  # e.g. 0.9998 keeps an EMA of the weights, evaluated too

    @model_validator(mode="after")
    def _recipe(self):
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1] (0.65-0.75 for fine-tuning) or null, got {self.layer_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        return self

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"both must be in [0, 1), got {list(v)}; e.g. [0.9, 0.999]")
        return v


class ScheduleConfig(Section):
    kind: Literal[SCHEDULES] = "cosine"
    warmup_steps: Annotated[int, bounded(ge=0, hint="(0: no warm-up)")] = 0
    min_lr: Annotated[float, bounded(ge=0)] = 0.0
    decay_fraction: Annotated[float, bounded(gt=0, le=1)] = 0.1  # wsd: the last fraction of the steps decays linearly to min_lr


class ParallelConfig(Section):
    zero_stage: Literal[ZERO_STAGES] = 2
    precision: Literal[PRECISIONS] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    grad_accum: int = 1
    activation_checkpointing: bool = False
    offload: Literal[OFFLOAD_MODES] = "none"  # distvit/offload/README.md; partial: DeepSpeed offload_optimizer.ratio
    offload_gpu_fraction: float | Literal["auto"] = "auto"
    # ZeRO-3 optimizer sub-group, in elements. auto: DeepSpeed's 1e9 for none/cpu; for interleaved
    # about 1/8 of a rank's optimizer state, so the update can be split between device and CPU.
    sub_group_size: int | Literal["auto"] = "auto"
    sp_size: int = 1
    sp_impl: Literal[SP_IMPLS] = "ulysses"
    ulysses_size: int | None = None  # sp_impl=hybrid: ranks per Ulysses group (divides sp_size); ring across them
    deepspeed_extra: str | dict[str, Any] | None = None  # DeepSpeed JSON merged in: a file path, or inline JSON / mapping

    @model_validator(mode="after")
    def _consistent(self):
        if self.offload != "none" and self.zero_stage == 0:
            raise ValueError(
                f"parallel.offload={self.offload} needs ZeRO stage 1-3 (got parallel.zero_stage=0); "
                "set parallel.zero_stage=2 or 3"
            )
        if self.offload in ("interleaved", "partial") and self.zero_stage != 3:
            raise ValueError(
                f"parallel.offload={self.offload} splits ZeRO-3's optimizer sub-groups between device and CPU "
                f"(got zero_stage={self.zero_stage}); set parallel.zero_stage=3"
            )
        OffloadSettings.from_config(self)  # the fraction's range and its fit with the mode
        if (self.sp_impl == "hybrid") != (self.ulysses_size is not None):
            raise ValueError(f"parallel.ulysses_size={self.ulysses_size} with parallel.sp_impl={self.sp_impl}: set "
                             "ulysses_size (a divisor of sp_size) exactly when sp_impl=hybrid")
        if self.ulysses_size is not None and (self.ulysses_size < 1 or self.sp_size % self.ulysses_size):
            raise ValueError(f"parallel.ulysses_size={self.ulysses_size} does not divide parallel.sp_size={self.sp_size}; "
                             f"choose one of {[d for d in range(1, self.sp_size + 1) if self.sp_size % d == 0]}")
        for name in ("grad_accum", "sp_size", "sub_group_size"):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        return self


class DistillConfig(Section):
    """Knowledge distillation from a frozen teacher (DeiT); distvit/engine/distill.py implements it."""

    kind: Literal[DISTILL_KINDS] = "none"
    teacher: str | None = None  # a registered model name, e.g. regnety_160 or vit_digits
    teacher_checkpoint: str | None = None  # the teacher's weights (.safetensors / .pt), loaded strict
    alpha: float = 0.5  # weight of the distillation term; the label term gets 1 - alpha
    tau: float = 1.0  # soft distillation temperature

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind != "none" and (not self.teacher or not self.teacher_checkpoint):
            missing = "distill.teacher" if not self.teacher else "distill.teacher_checkpoint"
            raise ValueError(
                f"distill.kind={self.kind} needs a teacher model and its weights, but {missing} is not set; "
                "set distill.teacher=<model name> and distill.teacher_checkpoint=<weights file>, or distill.kind=none"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.tau <= 0.0:
            raise ValueError(f"distill.tau must be > 0, got {self.tau}")
        return self


class CheckpointConfig(Section):
    every_steps: Annotated[int, bounded(ge=0, hint="(0: only at the end)")] = 0
    # complete checkpoints kept in the run folder (older ones are deleted)
    keep: Annotated[int, bounded(ge=1, hint="(the newest checkpoint is what --resume needs)")] = 3
    resume: str | None = None  # "auto" (newest complete checkpoint of the run folder) or a path
    export: bool = True  # at the end, consolidate to <run>/model.safetensors (fp32)
    # async: snapshot to host memory at the save step, write in the background (checkpoint/async_save.py).
    # `async` is a Python keyword: declared through the class namespace, read as getattr(cfg.checkpoint, "async").
    __annotations__["async"] = bool
    locals()["async"] = False


class TaskConfig(Section):
    """What the model learns: classify (labels, cross-entropy) or autoregressive (AIM next-patch
    pixel regression with a causal model, vit_causal_*; distvit/engine/tasks.py)."""

    kind: Literal[TASKS] = "classify"
    # autoregressive: the first K patches attend both ways (AIM prefix); no loss on them
    prefix_patches: Annotated[int, bounded(ge=0, hint="(0: plain causal)")] = 0
    norm_pix: bool = True  # autoregressive: targets are each patch normalised by its own mean/std (AIM, MAE)

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind == "classify" and self.prefix_patches:
            raise ValueError(f"task.prefix_patches={self.prefix_patches} applies to next-patch prediction; set "
                             "task.kind=autoregressive (with a vit_causal_* model) or task.prefix_patches=0")
        return self


class LogConfig(Section):
    every_steps: Annotated[int, bounded(ge=1, hint="(optimizer steps between log lines)")] = 10
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float | None = None  # device peak for MFU; None: looked up by device name


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    parallel: ParallelConfig = ParallelConfig()
    distill: DistillConfig = DistillConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    task: TaskConfig = TaskConfig()

    @model_validator(mode="after")
    def _optimizer_fits_parallel(self):
        name, p = self.optim.name, self.parallel
        if name != "adamw" and p.offload != "none":
            raise ValueError(f"optim.name={name} with parallel.offload={p.offload}: DeepSpeed's CPU offload steps "
                             "with DeepSpeedCPUAdam; use optim.name=adamw or parallel.offload=none")
        if name == "lamb" and p.zero_stage != 0:
            raise ValueError(f"optim.name=lamb needs whole tensors for its trust ratio, but ZeRO stage {p.zero_stage} "
                             "hands the optimizer flat partitions; set parallel.zero_stage=0 or optim.name=adamw")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name
