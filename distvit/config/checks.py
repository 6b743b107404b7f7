"""Config rules that span sections, and names that must exist; run by `load_config` after pydantic
(`check_across_sections`), and the rules that need the launch (data-parallel ranks, device) or the
model classes, run by config/resolve.py before any process group exists (`check_launch`).

Each error names the key (and, at load, where its value came from: file or `--set` flag) and the
fix. Library entry points that take the same inputs (the data loader, build_ds_config, the packed
trainer) call the same functions here, so one rule has one text.
"""
from __future__ import annotations

import difflib

import torch

from distvit.config.load import origin_of
from distvit.config.schema import Config, ConfigError


def check_across_sections(cfg: Config, origins: dict[str, str]) -> None:
    """Rules that span sections, and names that must exist: a value accepted here must not break later."""
    def bad(key: str, text: str) -> ConfigError:
        return ConfigError(f"bad value for config key '{key}' (from {origin_of(origins, key)}): {text}")

    if cfg.schedule.min_lr > cfg.optim.lr:
        raise bad("schedule.min_lr", f"{cfg.schedule.min_lr} is above the peak optim.lr={cfg.optim.lr} "
                  f"(from {origin_of(origins, 'optim.lr')}); set schedule.min_lr <= optim.lr, e.g. 0")
    for key, given, data_key in (("model.img_size", cfg.model.img_size, "data.img_size"),
                                 ("model.in_chans", cfg.model.in_chans, "data.in_chans")):
        have = getattr(cfg.data, data_key.split(".")[1], None)
        if given is not None and have is not None and given != have:
            raise bad(key, f"{given}, but the data loader yields {data_key}={have} (from {origin_of(origins, data_key)}); "
                      f"set both to the same value, or leave {key} unset (it follows {data_key})")
    from distvit import models

    for key, name in (("model.name", cfg.model.name), ("distill.teacher", cfg.distill.teacher)):
        if name is not None and name not in models.list_models():
            close = difflib.get_close_matches(name, models.list_models(), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"registered models: {', '.join(models.list_models())}"
            raise bad(key, f"no model named '{name}'; {hint}")

    _check_task(cfg, bad)
    check_run(cfg)


def check_run(cfg: Config) -> None:
    """Rules the engine used to meet only after start-up; config alone decides them (load and resolve run them)."""
    if cfg.optim.ema_decay is not None and cfg.parallel.zero_stage == 3:
        raise ConfigError("optim.ema_decay needs full weights on every rank, which ZeRO-3 partitions; "
                          "use parallel.zero_stage <= 2 or set optim.ema_decay=null")
    if not cfg.run.max_steps and not cfg.run.epochs:
        raise ConfigError("set run.epochs or run.max_steps (both are empty)")


def check_launch(cfg: Config, *, dp_size: int, device: torch.device) -> None:
    """What this launch could not run, refused before any process group or engine (config/resolve.py)."""
    check_run(cfg)
    problem = repeated_aug_error(cfg.data.repeated_aug, dp_size)
    if problem:
        raise ConfigError(problem)
    check_param_offload(cfg, device)
    check_packing(cfg)


def repeated_aug_error(repeated_aug: int, dp_size: int) -> str | None:
    """The refusal of data.repeated_aug above the data-parallel ranks (the data loader raises it as a DataError)."""
    if repeated_aug <= dp_size:
        return None
    return (f"data.repeated_aug={repeated_aug} repeats each sample on that many different ranks, "
            f"but there are {dp_size} data-parallel ranks; set data.repeated_aug <= {dp_size} (1: off)")


def check_param_offload(cfg: Config, device: torch.device) -> None:
    """Interleaved offload updates ZeRO-3's partitions on the device: the DeepSpeed JSON may not keep them on the
    host (zero_optimization.offload_param.device=cpu), except on a CPU run. build_ds_config calls it too."""
    if cfg.parallel.offload != "interleaved" or device.type == "cpu" or not cfg.parallel.deepspeed_extra:
        return
    from distvit.parallel.deepspeed_config import read_user_json

    extra, _ = read_user_json(cfg.parallel.deepspeed_extra)
    zero = extra.get("zero_optimization") if isinstance(extra, dict) else None
    param = zero.get("offload_param") if isinstance(zero, dict) else None
    if isinstance(param, dict) and param.get("device", "none") == "cpu":
        from distvit.offload._interleaved import param_offload_error

        raise ConfigError(param_offload_error(device, f"parallel.deepspeed_extra '{cfg.parallel.deepspeed_extra}'"))


def check_packing(cfg: Config) -> None:
    """data.packing needs a packed forward in the student, and in the teacher of distillation (built on the
    meta device here: the class decides, no weights)."""
    if cfg.data.packing is None:
        return
    from distvit import models

    with torch.device("meta"):
        check_packed_student(cfg, models.create(cfg.model.name))
        if cfg.distill.kind != "none" and cfg.distill.teacher:
            check_packed_teacher(cfg, models.create(cfg.distill.teacher))


def check_packed_student(cfg: Config, model: torch.nn.Module) -> None:
    """data.packing needs a model with forward_packed: the ViT family (square-batch augmentations are
    refused by the data config itself)."""
    if cfg.data.packing is None:
        return
    if not hasattr(model, "forward_packed"):
        raise ConfigError(f"data.packing needs a model with a packed forward (the ViT/DeiT family); "
                          f"model.name={cfg.model.name!r} has none; pick a ViT or set data.packing=null")


def check_packed_teacher(cfg: Config, teacher: torch.nn.Module | None) -> None:
    if cfg.data.packing is not None and teacher is not None and not hasattr(teacher, "forward_packed"):
        raise ConfigError(f"data.packing: the teacher distill.teacher={cfg.distill.teacher!r} has no packed forward "
                          "(it must see the student's packed batch); pick a ViT/DeiT teacher or set data.packing=null")


def _check_task(cfg: Config, bad) -> None:
    """The task and the model must fit: a causal model predicts patches and has no classifier."""
    from distvit.models.causal_vit import AUTOREGRESSIVE_MODELS

    causal = cfg.model.name in AUTOREGRESSIVE_MODELS
    if cfg.task.kind == "classify":
        if causal:
            raise bad("model.name", f"{cfg.model.name} is an autoregressive next-patch model with no classifier; "
                      "set task.kind=autoregressive (e.g. --config aim_digits), or pick a classifier such as vit_digits")
        return
    if not causal:
        raise bad("task.kind", f"autoregressive needs a causal model, but model.name={cfg.model.name}; set "
                  f"model.name to one of {', '.join(sorted(AUTOREGRESSIVE_MODELS))}")
    reason = None
    if cfg.distill.kind != "none":
        reason = ("distill.kind", "distillation matches a teacher's class logits; set distill.kind=none")
    elif cfg.data.mixup or cfg.data.cutmix:
        reason = ("data.mixup" if cfg.data.mixup else "data.cutmix", "mixing images and labels is for classification; set it to 0")
    elif cfg.model.num_classes is not None:
        reason = ("model.num_classes", "a causal model has no classifier; leave model.num_classes unset")
    elif cfg.parallel.sp_size > 1 and cfg.parallel.sp_impl == "hybrid":
        reason = ("parallel.sp_impl", "the causal ViT shards over ring (zig-zag) or ulysses; set parallel.sp_impl=ring")
    elif cfg.parallel.sp_size > 1 and cfg.task.prefix_patches:
        reason = ("task.prefix_patches", "prefix attention is not sequence-parallel yet; set task.prefix_patches=0 "
                  "or parallel.sp_size=1")
    if reason:
        key, text = reason
        raise bad(key, f"{getattr(getattr(cfg, key.split('.')[0]), key.split('.')[1])} with task.kind=autoregressive: "
                  f"{text}")
