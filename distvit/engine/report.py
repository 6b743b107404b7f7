"""What a run tells its user: the start-up plan, the metrics row of a log step, and the final
summary (summary.json). Functions of the Trainer `t`, kept apart so the loop reads as a loop."""
from __future__ import annotations

import json
from pathlib import Path

from distvit import offload
from distvit.checkpoint import io as ckio
from distvit.engine import packed_train
from distvit.engine.metrics import peak_memory_gib
from distvit.engine.step_tuning import grad_norm


def run_plan(t) -> str:
    """The start-up lines: model, ranks, mesh, precision, batch arithmetic, lr, FLOPs, resume."""
    cfg = t.cfg
    global_batch = cfg.data.batch_size * cfg.parallel.grad_accum * t.mesh.dp_size
    tokens = (getattr(getattr(t.engine.module, "patch_embed", None), "num_patches", None)
              or getattr(t.engine.module, "num_patches", None))
    tokens = None if cfg.data.packing else tokens  # packed: images of many sizes (packed_train.describe)
    lines = [
        f"distvit: {cfg.model.name} ({t.num_params / 1e6:.2f}M params) on {t.mesh.world_size} rank(s) "
        f"[{t.info.launcher}], dp={t.mesh.dp_size} sp={t.mesh.sp_size}, device={t.device.type}, "
        f"ZeRO-{cfg.parallel.zero_stage}, {t.precision}, offload={cfg.parallel.offload}",
        f"  global batch {global_batch} = {cfg.data.batch_size} per rank x {cfg.parallel.grad_accum} accum x "
        f"{t.mesh.dp_size} dp; {t.steps_per_epoch} steps/epoch; {t.total_steps} steps in all"
        + (f"; {tokens} tokens/image, {tokens * global_batch} tokens/step" if tokens else ""),
        f"  {t.lr_line}",
    ]
    if t.flops_per_image:
        lines.append(f"  {3 * t.flops_per_image * global_batch / 1e12:.4f} TFLOPs/step (fwd+bwd)")
    if t.distiller is not None:
        lines.append(f"  {t.distiller.describe()}")
    if packed_train.describe(cfg):
        lines.append(packed_train.describe(cfg))
    if t.resume_from is not None:
        lines.append(f"  resumed from {t.resume_from} at step {t.step}, epoch {t.epoch}")
    lines.append(f"  run folder: {t.run_dir}")
    return "\n".join(lines)


def metrics_row(t, reading, img_per_s: float, step_time: float, flops_per_s: float | None) -> dict:
    """A log row: the last step's loss (mean over dp, from the fused read), lr and grad norm read now.
    flops_per_s: forward FLOPs of the real tokens trained per second, all ranks (engine/packed_train.py)."""
    tflops = mfu = None
    if flops_per_s:
        tflops = 3 * flops_per_s / 1e12 / t.mesh.world_size  # per rank
        mfu = tflops / t.peak_tflops if t.peak_tflops else None
    return {
        "step": t.step, "epoch": t.epoch, "loss": reading.loss, "lr": t.engine.get_lr()[0],
        "grad_norm": grad_norm(t.engine, t._clip),
        "img_per_s": img_per_s, "step_time_s": step_time, **_tokens_per_s(t, img_per_s), "tflops": tflops, "mfu": mfu,
        "peak_mem_gib": peak_memory_gib(t.device), "bad_samples": reading.bad_samples,
        **offload.stats(t.offload),
        **({"pack_fill": t.train_loader.stats()["pack_fill"]} if t.cfg.data.packing else {}),
    }


def summary(t, wall_s: float, last_eval: dict, tag_dir: Path, export: Path | None, reason: str) -> dict:
    """The run's result (also summary.json in the run folder): status, steps, throughput, accuracy, files."""
    summary = {
        "status": reason, "steps": t.step, "epochs": t.step / t.steps_per_epoch, "wall_s": wall_s,
        "img_per_s": t._images_done / max(wall_s, 1e-9),  # images counted per step (packed steps vary)
        **_tokens_per_s(t, t._images_done / max(wall_s, 1e-9)),
        **({"final_mse": last_eval["val_mse"]} if "val_mse" in last_eval else {}),
        "final_top1": last_eval.get("val_top1"), "final_top5": last_eval.get("val_top5"),
        "best_top1": t.best["val_top1"], "best_top5": t.best["val_top5"],
        **{f"final_{k[len('val_'):]}": v for k, v in last_eval.items() if k.startswith(("val_loss_", "val_top1_", "val_top5_"))},
        "checkpoint": str(tag_dir), "weights": None if export is None else str(export),
        "run_dir": str(t.run_dir),
    }
    if t.is_main:
        ckio.atomic_write_text(t.run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _tokens_per_s(t, img_per_s: float) -> dict:
    """The autoregressive task's throughput in patch tokens (its unit of work, as LLMs count)."""
    if t.task is None:
        return {}
    return {"tokens_per_s": img_per_s * t.task.tokens_per_image(t.engine.module)}
