"""Resume on a different world size: `distvit ckpt reshape SRC --out DIR`.

ZeRO-1/2/3 split the optimizer state (and under ZeRO-3 the weights) by data-parallel rank, so a
checkpoint saved by N ranks cannot be loaded by M directly. DeepSpeed's universal checkpoint
(`deepspeed.checkpoint.ds_to_universal`) rewrites every parameter's fp32 master weights and Adam
moments as whole tensors, zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, which an engine of any
world size re-partitions while loading (`"checkpoint": {"load_universal": true}` in its config).
Weights, optimizer moments, step count and learning-rate schedule all survive.
A ZeRO-0 checkpoint holds whole tensors already; it is copied.

The rest is kept in distvit_common.{json,safetensors} (checkpoint/state.py): step, epoch, best
metrics, EMA; every old dp rank's data-loader state, from which the resuming loader works out the
samples of the epoch no old rank consumed and splits them over its own ranks x workers
(data/remap.py); and the RNG state, which distvit keeps identical on every rank (all seeded with
run.seed, all drawing the same shapes), carried to every new rank so that the draws go on as the
old run's would have. If the old ranks' RNG states differ, no single state can stand for them: none
is kept and the resumed run reseeds from run.seed and the step, saying so. docs/checkpoints.md has
the rules.

The output is a normal step_* folder (COMPLETE, distvit.json with "reshaped_from"), written under
a temporary name and renamed when whole, and `latest` of DIR points at it, so a run whose
checkpoints folder is DIR continues from it with `--resume auto`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from distvit.checkpoint import io as ckio
from distvit.checkpoint import safe_load
from distvit.checkpoint import state as ckstate

COMMON_STATE = f"{ckstate.COMMON}.json"
UNIVERSAL_DIR = "zero"
UNIVERSAL_STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


class ReshapeError(RuntimeError):
    pass


def is_universal(tag_dir: Path) -> bool:
    """True for a reshaped checkpoint that DeepSpeed must load with `load_universal`."""
    tag_dir = Path(tag_dir)
    meta = ckio.read_meta_if_any(tag_dir)
    return meta is not None and meta.universal


def _common_state(src_tag: Path, world_size: int) -> dict:
    """What every rank of any world size resumes with: rank 0's step/epoch/best/EMA, every dp rank's
    data cursor, and the RNG state if all ranks share it."""
    from distvit.data import remap

    ranks = [ckstate.load_rank(src_tag, r) for r in range(world_size)]
    common = {key: ranks[0].get(key) for key in ("step", "epoch", "best", "ema")}
    common["data"] = remap.reshaped_state([r["data"] for r in ranks])
    common["rng"] = ranks[0]["rng"] if ckstate.same_rng(ranks) else None
    return common


def _to_universal(src_tag: Path, out_tag: Path, workers: int) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(src_tag), output_folder=str(out_tag), num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
        # Checkpoints saved without DeepSpeed's universal_checkpoint_info (plain data parallel,
        # nothing to merge across tensor-parallel ranks) only need the version marker.
        inject_missing_state=True,
    )
    # ds_to_universal narrates every stage on stdout; keep our stdout for our own summary.
    with contextlib.redirect_stdout(sys.stderr):
        ds_to_universal.main(args)
    # It also points a `latest_universal` file in the parent at its output: ours is `latest`.
    (out_tag.parent / "latest_universal").unlink(missing_ok=True)


def reshape(src_tag: Path, out_root: Path, *, workers: int = 1) -> Path:
    """Write a world-size-independent copy of the complete checkpoint `src_tag` into `out_root`.

    Returns the new step_* folder. Refuses to overwrite an existing one.
    """
    src_tag, out_root = Path(src_tag), Path(out_root)
    if not ckio.is_complete(src_tag):
        raise ReshapeError(f"{src_tag}: not a complete checkpoint (no {ckio.COMPLETE}); reshape a complete one, "
                           f"e.g. the run's checkpoints folder (its newest complete checkpoint is used)")
    meta = ckio.read_meta(src_tag)
    if meta.is_reshaped:
        raise ReshapeError(f"{src_tag} is already reshaped: any world size resumes it as it is (--resume {src_tag})")
    out_tag = out_root / src_tag.name
    if out_tag.resolve() == src_tag.resolve():
        raise ReshapeError(f"--out {out_root} is the source's own checkpoints folder; choose the checkpoints folder "
                           f"of the run that will resume (e.g. runs/<new name>/checkpoints)")
    if out_tag.exists():
        raise ReshapeError(f"{out_tag} already exists; remove it or choose another --out (nothing was overwritten)")
    safe_load.precheck(src_tag)  # ds_to_universal unpickles with weights_only=False
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{src_tag.name}.reshape-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        stage = meta.zero_stage
        if stage == 0:
            # Whole weights and optimizer state in one file: nothing depends on the world size.
            tmp.mkdir()
            shutil.copy2(src_tag / "mp_rank_00_model_states.pt", tmp / "mp_rank_00_model_states.pt")
        else:
            _to_universal(src_tag, tmp, workers)
        ckstate.save_common(tmp, **_common_state(src_tag, meta.world_size))
        ckio.atomic_write_text(tmp / ckio.META, meta.reshaped(src_tag).to_json())
        ckio.atomic_write_text(tmp / ckio.COMPLETE, _json({"files": ckio.build_manifest(tmp)}))
        os.replace(tmp, out_tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    newest = ckio.complete_checkpoints(out_root)
    if newest and newest[-1] == out_tag:
        ckio.atomic_write_text(out_root / ckio.LATEST, out_tag.name)
    return out_tag


def _json(obj: dict) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True)


def _model_states(tag_dir: Path) -> dict:
    """The first model-states file: mp_rank_00_* (ZeRO-0/1/2) or zero_pp_rank_0_* (ZeRO-3)."""
    files = sorted(Path(tag_dir).glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no *model_states.pt file; is this a DeepSpeed checkpoint folder?")
    return safe_load.load(files[0], mmap=True)


def _param_names(model_states: dict) -> list[str]:
    return [name for group in model_states.get("param_shapes") or [] for name in group]


def expected_universal_files(tag_dir: Path) -> list[str]:
    """zero/<param>/<state>.pt for every parameter the model-states file lists."""
    names = _param_names(_model_states(tag_dir))
    return [f"{UNIVERSAL_DIR}/{name}/{key}.pt" for name in names for key in UNIVERSAL_STATE_KEYS]


def universal_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a universal checkpoint: every parameter's zero/<name>/fp32.pt, plus buffers."""
    tag_dir = Path(tag_dir)
    states = _model_states(tag_dir)
    module = states.get("module") or {}
    out: dict[str, torch.Tensor] = {}
    for name in states.get("buffer_names") or []:
        if name in module:
            out[name] = module[name].float() if module[name].is_floating_point() else module[name]
    for name in _param_names(states):
        f = tag_dir / UNIVERSAL_DIR / name / "fp32.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing from the universal checkpoint {tag_dir}")
        out[name] = safe_load.load(f)["param"].float()
    for alias, target in (states.get("shared_params") or {}).items():  # tied weights
        out[alias] = out[target]
    return out
