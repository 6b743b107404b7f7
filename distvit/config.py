"""The run's configuration: one typed tree, loaded from YAML, overridden from the command line.

    cfg = load_config("configs/demo_digits.yaml", overrides=["optim.lr=3e-3", "run.name=try2"])

A YAML file may inherit from other files with a top-level `base:` (a path relative to the file,
or the name of a shipped config such as `demo_digits`, or a list of them, merged in order, the
file itself last). `--set section.key=value` values are
parsed as YAML scalars (`1e-3`, `true`, `[1, 2]`, `null`) and then validated against the field's
type by pydantic. Every error is one line naming the bad key, where it came from (file or flag)
and the fix; unknown keys get a difflib suggestion.

Each section is a pydantic model with `extra="forbid"`; the data section belongs to the data
package (`distvit.data.config.DataConfig`). Runtime objects (process groups, engines) are never
stored here: the tree flows one way, into the trainer.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from distvit.data.config import DataConfig
from distvit.errors import UserError
from distvit.offload import MODES as OFFLOAD_MODES
from distvit.offload import Settings as OffloadSettings

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message is one line meant for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = "default"
    output_dir: str = "runs"  # the run folder is output_dir/name
    seed: int = 0
    epochs: int | None = 1  # train for this many epochs ...
    max_steps: int | None = None  # ... or stop at this many optimizer steps (wins when both are set)
    eval_every: int = 0  # optimizer steps between evaluations; 0: at each epoch end and at the end
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    compile: bool = False  # torch.compile the model (inductor); see docs/recipes.md for the cost on CPU
    # A rendezvous or collective that waits longer than this for a peer (stopped, hung, killed)
    # ends every rank with an error naming the missing ranks (distvit/watchdog.py).
    collective_timeout_s: float = 300.0

    @field_validator("epochs", "max_steps")
    @classmethod
    def _positive_or_none(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1 or null, got {v}; a run needs at least one step")
        return v

    @field_validator("eval_every", "collective_timeout_s")
    @classmethod
    def _non_negative(cls, v, info):
        if v < 0 or (v == 0 and info.field_name == "collective_timeout_s"):
            raise ValueError(f"must be {'> 0 seconds' if info.field_name == 'collective_timeout_s' else '>= 0 (0: evaluate at each epoch end)'}, got {v}")
        return v


class ModelConfig(Section):
    name: str = "vit_digits"
    num_classes: int | None = None  # None: from the dataset manifest, else the model's default
    img_size: int | None = None  # None: data.img_size
    in_chans: int | None = None  # None: data.in_chans
    drop_path_rate: float = 0.0
    attn_backend: Literal["auto", "sdpa", "flash", "math"] = "auto"
    checkpoint: str | None = None  # initial weights (.safetensors / .pt), e.g. timm's
    freeze: list[str] = []  # fnmatch patterns of parameter names to freeze, e.g. ["patch_embed.*", "blocks.[0-5].*"]
    # Fine-tuning: re-initialise the checkpoint's classifier. null: only when its class count differs
    # from num_classes (said in one line); true: always; false: never (a misfit is an error).
    reset_head: bool | None = None

    @field_validator("drop_path_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v


class OptimConfig(Section):
    name: Literal["adamw", "lamb", "sgd"] = "adamw"
    lr: float = 1e-3  # peak learning rate
    # ... or the peak LR at a reference global batch, scaled to the run's (timm's --lr-base;
    # distvit/engine/lr_scale.py): lr = lr_base * (global_batch / lr_base_size), or its sqrt.
    lr_base: float | None = None
    lr_base_size: int = 256
    lr_base_scale: Literal["linear", "sqrt"] = "linear"
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm (or max |element|, clip_mode=value); null: off
    clip_mode: Literal["norm", "value"] = "norm"
    layer_decay: float | None = None  # lr scale per block, layer_decay ** (layers above); e.g. 0.65 (MAE/BEiT)
    momentum: float = 0.9  # sgd only (Nesterov)
    label_smoothing: float = 0.0
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

    @field_validator("lr", "eps")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("weight_decay", "label_smoothing")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v


class ScheduleConfig(Section):
    kind: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_fraction: float = 0.1  # wsd: the last fraction of the steps decays linearly to min_lr

    @field_validator("decay_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"schedule.decay_fraction must be in (0, 1], got {v}")
        return v

    @field_validator("warmup_steps")
    @classmethod
    def _warmup(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0 (0: no warm-up), got {v}")
        return v

    @field_validator("min_lr")
    @classmethod
    def _min_lr(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v


class ParallelConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    grad_accum: int = 1
    activation_checkpointing: bool = False
    offload: Literal[OFFLOAD_MODES] = "none"  # distvit/offload/README.md; partial: DeepSpeed offload_optimizer.ratio
    offload_gpu_fraction: float | Literal["auto"] = "auto"
    # ZeRO-3 optimizer sub-group, in elements. auto: DeepSpeed's 1e9 for none/cpu; for interleaved
    # about 1/8 of a rank's optimizer state, so the update can be split between device and CPU.
    sub_group_size: int | Literal["auto"] = "auto"
    sp_size: int = 1
    sp_impl: Literal["ulysses", "ring", "hybrid"] = "ulysses"
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

    kind: Literal["none", "hard", "soft"] = "none"
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
    every_steps: int = 0  # 0: only at the end
    keep: int = 3  # complete checkpoints kept in the run folder (older ones are deleted)
    resume: str | None = None  # "auto" (newest complete checkpoint of the run folder) or a path
    export: bool = True  # at the end, consolidate to <run>/model.safetensors (fp32)

    @field_validator("keep")
    @classmethod
    def _keep(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (the newest checkpoint is what --resume needs), got {v}")
        return v

    @field_validator("every_steps")
    @classmethod
    def _every(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0 (0: only at the end), got {v}")
        return v


class TaskConfig(Section):
    """What the model learns: classify (labels, cross-entropy) or autoregressive (AIM next-patch
    pixel regression with a causal model, vit_causal_*; distvit/engine/tasks.py)."""

    kind: Literal["classify", "autoregressive"] = "classify"
    prefix_patches: int = 0  # autoregressive: the first K patches attend both ways (AIM prefix); no loss on them
    norm_pix: bool = True  # autoregressive: targets are each patch normalised by its own mean/std (AIM, MAE)

    @model_validator(mode="after")
    def _consistent(self):
        if self.prefix_patches < 0:
            raise ValueError(f"task.prefix_patches must be >= 0 (0: plain causal), got {self.prefix_patches}")
        if self.kind == "classify" and self.prefix_patches:
            raise ValueError(f"task.prefix_patches={self.prefix_patches} applies to next-patch prediction; set "
                             "task.kind=autoregressive (with a vit_causal_* model) or task.prefix_patches=0")
        return self


class LogConfig(Section):
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float | None = None  # device peak for MFU; None: looked up by device name

    @field_validator("every_steps")
    @classmethod
    def _every(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (optimizer steps between log lines), got {v}")
        return v


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


# ----------------------------------------------------------------------------------- loading


def shipped_configs() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, else a name under configs/ (with or without .yaml)."""
    p = Path(path)
    candidates = [p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"] if not p.is_absolute() else [p]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"config file '{path}' not found; configs that ship (in {CONFIG_DIR}): "
        + (", ".join(shipped_configs()) or "none")
    )


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file's syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, model:, ...), got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origins: dict[str, str], origin: str, prefix: str = "") -> None:
    """Deep-merge src into dst, recording for every leaf key where its value came from."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origins, origin, dotted + ".")
        else:
            dst[key] = value
            _record(origins, dotted, value, origin)


def _record(origins: dict[str, str], dotted: str, value: Any, origin: str) -> None:
    origins[dotted] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origins, f"{dotted}.{k}", v, origin)


def _load_file(path: Path, origins: dict[str, str], stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"config inheritance loops: {chain}; remove one of the `base:` entries")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else (bases or []):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file() and not Path(base).is_absolute():  # a shipped config by name, as --config finds it
            base_path = next((c for c in (CONFIG_DIR / base, CONFIG_DIR / f"{base}.yaml") if c.is_file()), base_path)
        if not base_path.is_file():
            raise ConfigError(f"{path}: base '{base}' not found (looked at {base_path} and in {CONFIG_DIR}); fix the "
                              f"`base:` path, or name a shipped config: {', '.join(shipped_configs()) or 'none'}")
        _merge(merged, _load_file(base_path, origins, (*stack, path)), origins, str(base_path))
    _merge(merged, data, origins, str(path))
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value, e.g. --set optim.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(f"--set {text}: the key must name a section and a field, e.g. optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply_override(tree: dict, key: str, value: Any, origins: dict[str, str], origin: str) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: '{key}' goes through a value that is not a section")
    node[parts[-1]] = value
    _record(origins, key, value, origin)


def _origin(origins: dict[str, str], dotted: str) -> str:
    """Where a key's value came from: the key itself, else the fields under it (a section), else the
    list field holding it; 'defaults' if nothing set it (a file that sets other keys of its section
    did not set this one)."""
    if dotted in origins:
        return origins[dotted]
    under = [o for k, o in origins.items() if k.startswith(dotted + ".")]
    if under:
        return ", ".join(dict.fromkeys(under))
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        if parent in origins and parent not in Config.model_fields:  # an item of a list field, not a section
            return origins[parent]
    return "defaults"


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(_all_keys(sub, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _check_unknown(tree: dict, model: type[BaseModel], origins: dict[str, str], prefix: str = "") -> None:
    """Unknown keys, found before pydantic so the message can say where the key came from."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            valid = list(model.model_fields)
            # The same name in another section first (a key in the wrong section), then a typo here,
            # then a typo anywhere in the tree.
            close = [k for k in _all_keys(Config) if k.rsplit(".", 1)[-1] == key][:1]
            close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            close = close or difflib.get_close_matches(dotted, _all_keys(Config), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0] if '.' in close[0] else prefix + close[0]}'?" if close else (
                f"valid keys here: {', '.join(prefix + v for v in valid)}"
            )
            raise ConfigError(f"unknown config key '{dotted}' (from {_origin(origins, dotted)}); {hint}")
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{dotted}' (from {_origin(origins, dotted)}) is a section; "
                    f"give its fields, e.g. {dotted}.{next(iter(sub.model_fields))}=..."
                )
            _check_unknown(value, sub, origins, dotted + ".")


def _type_error(exc: ValidationError, tree: dict, origins: dict[str, str]) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal["))]
    # Drop pydantic's union-member labels ("int", "float", ...) from the location.
    fields = []
    model: Any = Config
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            fields.append(part)
            model = model.model_fields[part].annotation
        elif part.isdigit():
            fields.append(part)
    dotted = ".".join(fields)
    value: Any = tree
    for part in fields:
        value = value.get(part) if isinstance(value, dict) else (value[int(part)] if isinstance(value, list) and part.isdigit() and int(part) < len(value) else None)
    where = _origin(origins, dotted)
    expected = err["msg"]
    if err["type"] == "value_error":
        text = expected.removeprefix("Value error, ")
        # A rule over several keys (offload x zero_stage): say where each key it names came from.
        named = [k for k in _all_keys(Config) if k.startswith(dotted + ".") and re.search(rf"\b{re.escape(k)}\b", text)]
        if named:
            where = ", ".join(f"{k} from {_origin(origins, k)}" for k in named)
            return ConfigError(f"bad config ({where}): {text}")
        return ConfigError(f"bad value for config key '{dotted}' (from {where}): {text}")
    return ConfigError(f"bad value for config key '{dotted}' (from {where}): got {value!r}; expected {expected.lower()}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the Config tree: defaults <- YAML file (and its bases) <- `--set` overrides."""
    origins: dict[str, str] = {}
    tree: dict = _load_file(resolve_config_path(path), origins) if path else {}
    for text in overrides or []:
        key, value = parse_override(text)
        _apply_override(tree, key, value, origins, f"--set {text}")
    _check_unknown(tree, Config, origins)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise _type_error(exc, tree, origins) from None
    from distvit.config_checks import check_across_sections

    check_across_sections(cfg, origins)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (atomically: a reader never sees half a file)."""
    from distvit.checkpoint.io import atomic_write_text

    atomic_write_text(Path(path), cfg.to_yaml())
