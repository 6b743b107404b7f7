"""The DeepSpeed config, generated from ours (never a hand-kept JSON).

`build_ds_config(cfg, device)` maps the parallel/optim sections onto DeepSpeed's keys. A user's
extra JSON (`parallel.deepspeed_extra`: a file path, or the JSON itself, inline or as a YAML mapping)
is merged in. Keys we only default (`steps_per_print`, `wall_clock_breakdown`, bucket and overlap
knobs, fp16 loss scaling) take the user's value. Keys that carry a distvit setting (`OWNED` below:
batch, accumulation, ZeRO stage, precision, clipping, offload) set to another value are an error
naming both sources and the distvit key to set instead, because two sources of truth for one
setting is how runs silently differ from their config.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distvit.config import Config, ConfigError
from distvit.config.checks import check_param_offload
from distvit.config.resolve import resolve_precision


DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000


def resolve_sub_group_size(cfg: Config, elements_per_rank: int | None) -> int:
    """`parallel.sub_group_size`, with "auto" made concrete (see the config's comment)."""
    size = cfg.parallel.sub_group_size
    if size != "auto":
        return size
    if cfg.parallel.offload == "interleaved" and elements_per_rank:
        from distvit.offload._interleaved import suggest_sub_group_size

        budget = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
        return suggest_sub_group_size(elements_per_rank, memory_budget=budget)
    return DEEPSPEED_SUB_GROUP_SIZE


def offload_fragment(cfg: Config) -> dict[str, Any]:
    """parallel.offload as DeepSpeed keys: built by the offload package (its one place for that)."""
    from distvit.offload import Settings

    return Settings.from_config(cfg.parallel).ds_fragment()


def build_ds_config(cfg: Config, device: torch.device, *, elements_per_rank: int | None = None,
                    world_size: int | None = None) -> dict[str, Any]:
    """elements_per_rank: trainable parameters / ZeRO partitions, for sub_group_size=auto; world_size: all ranks."""
    precision = resolve_precision(cfg, device)
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    sub_group_size = resolve_sub_group_size(cfg, elements_per_rank)
    if cfg.parallel.zero_stage == 3:
        zero.update(sub_group_size=sub_group_size, stage3_gather_16bit_weights_on_model_save=False)
    if cfg.parallel.zero_stage >= 2:
        # contiguous_gradients copies each gradient into a bucket to spare the CUDA caching allocator
        # fragmentation; on the CPU that is only one more copy of every gradient per step.
        zero.update(overlap_comm=device.type == "cuda", contiguous_gradients=device.type == "cuda")
    if world_size == 1 and cfg.parallel.zero_stage in (1, 2):
        zero.update(reduce_scatter=False)  # one rank: a per-parameter offsets loop for a scatter to nobody
    zero.update(offload_fragment(cfg))
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.parallel.grad_accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # we pass torch's AdamW on the CPU
        "steps_per_print": 10**9,  # our own logging; keep DeepSpeed's quiet
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every step's start and end, for a
        # figure it prints every steps_per_print steps (never, above): two host syncs a step for nothing.
        # The Trainer times its own read windows. A deepspeed_extra "timers" section turns it back on.
        "timers": {"throughput": {"enabled": False}},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    # Always explicit: DeepSpeed 0.19 clips at norm 1.0 when the key is absent (GRADIENT_CLIPPING_DEFAULT),
    # so grad_clip=null (and clip_mode=value, which engine/optim.py applies) must say 0 (off) here.
    norm_clip = cfg.optim.grad_clip is not None and cfg.optim.clip_mode == "norm"
    ds["gradient_clipping"] = cfg.optim.grad_clip if norm_clip else 0.0
    if cfg.parallel.deepspeed_extra:
        ds = merge_user_json(ds, cfg.parallel.deepspeed_extra)
    check_param_offload(cfg, device)  # the config's rule (resolve() runs it before start-up), for direct callers
    return ds


# DeepSpeed keys generated from a distvit setting: the JSON may repeat them, not change them.
OWNED = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "parallel.grad_accum",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.sub_group_size": "parallel.sub_group_size",
    "zero_optimization.offload_optimizer": "parallel.offload",
    "zero_optimization.offload_optimizer.device": "parallel.offload",
    "bf16.enabled": "parallel.precision",
    "fp16.enabled": "parallel.precision",
    "gradient_clipping": "optim.grad_clip",
    "zero_allow_untested_optimizer": "nothing (distvit hands DeepSpeed its own optimizer; leave the key out)",
}


def read_user_json(extra: str | dict) -> tuple[dict, str]:
    """(the JSON as a dict, how to name it in messages): a mapping, inline JSON text, or a file path."""
    if isinstance(extra, dict):
        return extra, "parallel.deepspeed_extra (inline)"
    text = extra.strip()
    if text.startswith("{"):
        try:
            return json.loads(text), "parallel.deepspeed_extra (inline)"
        except json.JSONDecodeError as exc:
            raise ConfigError(f"parallel.deepspeed_extra: inline JSON {text[:60]!r} is not valid JSON ({exc}); "
                              "quote it for the shell, e.g. --set 'parallel.deepspeed_extra={\"steps_per_print\": 50}'") from None
    p = Path(extra)
    if not p.is_file():
        raise ConfigError(f"parallel.deepspeed_extra: '{extra}' not found; give the path of a DeepSpeed JSON file "
                          "or the JSON itself ({...})")
    try:
        return json.loads(p.read_text()), f"parallel.deepspeed_extra '{extra}'"
    except json.JSONDecodeError as exc:
        raise ConfigError(f"parallel.deepspeed_extra: '{extra}' is not valid JSON ({exc})") from None


def merge_user_json(generated: dict, extra: str | dict) -> dict:
    data, name = read_user_json(extra)
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a JSON object of DeepSpeed keys, got {type(data).__name__}")
    conflicts: list[str] = []
    merged = _merge_checked(generated, data, "", conflicts)
    if conflicts:
        raise ConfigError(
            f"{name} conflicts with the distvit config: {'; '.join(conflicts)}; "
            "set these in the distvit config (configs/*.yaml or --set) and remove them from the JSON"
        )
    return merged


def _merge_checked(ours: dict, theirs: dict, prefix: str, conflicts: list[str]) -> dict:
    out = dict(ours)
    for key, value in theirs.items():
        dotted = f"{prefix}{key}"
        if key not in out:
            if dotted in OWNED:  # e.g. offload_optimizer while parallel.offload=none
                conflicts.append(f"{dotted} is {value!r} in the JSON but derived by distvit (set {OWNED[dotted]})")
            else:
                out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge_checked(out[key], value, dotted + ".", conflicts)
        elif out[key] != value and dotted in OWNED:
            conflicts.append(f"{dotted} is {value!r} in the JSON but {out[key]!r} from distvit (set {OWNED[dotted]})")
        else:
            out[key] = value  # a default of ours (logging, buckets, overlap, loss scaling): the user's wins
    return out
