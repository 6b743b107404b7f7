"""A ZeRO-3 checkpoint of any model size, in DeepSpeed's real format, without training it.

A 300M-parameter model cannot be trained with ZeRO-3 on this 2-core machine in a test's time, so
we take a *template*: the files of a real ZeRO-3 save (a short 2-rank run, any small model), keep
every field DeepSpeed wrote (scheduler, ds_config, versions, loss scaler, optimizer hyper-
parameters), and replace what depends on the model: `param_shapes` and the zero-size parameter
placeholders in each rank's model-states file, and in each rank's optimizer-states file the flat
fp32 partitions (`fp32_flat_groups`) and Adam's moments, partitioned as ZeRO-3 does (each
parameter padded to a multiple of the world size, rank r holding the r-th slice). DeepSpeed's own
`zero_to_fp32` reads the result back to the original weights (tests/test_consolidate_stream.py).

One rank is built and written at a time, so generating needs the model plus one rank's state.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from pathlib import Path

import torch

from distvit.checkpoint import safe_load


def _no_decay(name: str, t: torch.Tensor) -> bool:
    return t.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))


def write_zero3(template: Path, out: Path, state_dict: dict[str, torch.Tensor], world: int = 2) -> Path:
    """Write `state_dict` (fp32 weights) as a ZeRO-3 checkpoint of `world` ranks into the folder `out`."""
    template, out = Path(template), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model0 = safe_load.load(template / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    optim0 = safe_load.load(template / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    n_groups = len(optim0["optimizer_state_dict"]["fp32_flat_groups"])
    names = list(state_dict)
    groups = [[n for n in names if not _no_decay(n, state_dict[n])], [n for n in names if _no_decay(n, state_dict[n])]]
    groups = groups[:n_groups] if n_groups == 2 else [names]
    for rank in range(world):
        model = copy.copy(model0)
        model["module"] = OrderedDict((n, torch.empty(0)) for n in names)  # ZeRO-3's placeholders
        model["param_shapes"] = [OrderedDict((n, state_dict[n].shape) for n in g) for g in groups]
        model["buffer_names"] = []
        model["dp_world_size"] = world
        torch.save(model, out / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        del model
        optim = copy.copy(optim0)
        osd = dict(optim0["optimizer_state_dict"])
        flats = []
        for g in groups:
            parts = []
            for n in g:
                flat = state_dict[n].detach().reshape(-1).float()
                part = math.ceil(flat.numel() / world)
                padded = torch.nn.functional.pad(flat, (0, part * world - flat.numel()))
                parts.append(padded[rank * part:(rank + 1) * part])
            flats.append(torch.cat(parts))
            del parts
        inner = copy.copy(osd["optimizer_state_dict"])
        step = next(iter(inner["state"].values()))["step"]
        inner["state"] = {i: {"step": step.clone(), "exp_avg": f * 0.1, "exp_avg_sq": f * f} for i, f in enumerate(flats)}
        osd["optimizer_state_dict"] = inner
        osd["fp32_flat_groups"] = flats
        osd["partition_count"] = world
        optim["optimizer_state_dict"] = osd
        torch.save(optim, out / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        del optim, osd, inner, flats
    return out


def finish(template: Path, out: Path, model: str) -> None:
    """Make `out` a complete distvit checkpoint: the template's per-rank state files, distvit.json
    naming `model`, then COMPLETE (the manifest) and `latest`, as the trainer writes them."""
    import dataclasses
    import shutil

    from distvit.checkpoint import io as ckio

    for f in Path(template).glob("distvit_rank*"):
        shutil.copy(f, Path(out) / f.name)
    meta = ckio.read_meta(template)
    config = meta.config
    ckio.mark_complete(Path(out), dataclasses.replace(
        meta, model=model, zero_stage=3, config={**config, "model": {**config.get("model", {}), "name": model}}))
