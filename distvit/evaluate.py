"""`distvit eval`: top-1/top-5, per-class accuracy and a confusion matrix of a trained run, one process.

    distvit eval --checkpoint runs/demo_digits --data 'data/digits/val-*.tar'

Reads the run's config for the model and its preprocessing (distvit/inference.py), streams the shards
once through the same val loader the trainer uses (every sample once; a run trained with
data.packing is evaluated as its trainer did: every image at its native size, packed), and writes
`<out>/eval.json` (the numbers and the matrix) and `<out>/confusion.png` (rows: true class,
columns: predicted, shade: share of the row); out defaults to `<run folder>/eval` (for a checkpoint
folder `checkpoints/step_N`: `<run folder>/eval/step_N`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from distvit.inference import LoadedRun, load_run


@torch.no_grad()
def evaluate(run: LoadedRun, data: str | None = None, batch_size: int | None = None, num_workers: int = 0) -> dict:
    from distvit.data import build_val_loader
    from distvit.engine.packed_train import patch_size

    pattern = data or run.cfg.data.val
    if not pattern:
        raise ValueError("the run's config has no data.val; pass the shards to evaluate with --data PATTERN")
    dcfg = run.cfg.data.model_copy(update=dict(val=pattern, manifest=None, num_workers=num_workers, on_error="raise",
                                               batch_size=batch_size or run.cfg.data.batch_size))
    n = len(run.classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    top5 = 0
    # data.packing: the packed val loader (native sizes) needs the model's patch size; its batches are PackedBatch
    loader = build_val_loader(dcfg, dp_rank=0, dp_size=1, patch_size=patch_size(run.model) if dcfg.packing else None)
    for images, labels, valid in loader:
        logits = run.logits(images.to(run.device, dtype=torch.float32)).cpu()  # a tensor or a PackedBatch
        labels, logits = labels[valid], logits[valid]  # padding samples (valid=False) are not counted
        confusion.index_put_((labels, logits.argmax(-1)), torch.ones_like(labels), accumulate=True)
        top5 += int((logits.topk(min(5, n), -1).indices == labels[:, None]).any(-1).sum())
    total = int(confusion.sum())
    per_class = {run.classes[i]: {"correct": int(confusion[i, i]), "count": int(confusion[i].sum()),
                                  "top1": 100.0 * int(confusion[i, i]) / max(1, int(confusion[i].sum()))}
                 for i in range(n)}
    return {"weights": run.weights, "model": run.cfg.model.name, "data": pattern, "count": total,
            "top1": 100.0 * int(confusion.diagonal().sum()) / max(1, total), "top5": 100.0 * top5 / max(1, total),
            "per_class": per_class, "classes": run.classes, "confusion": confusion.tolist()}


def confusion_png(confusion: list[list[int]], classes: list[str], path: Path, max_side: int = 1024) -> Path:
    """Row-normalised heat map (white 0 -> dark blue 1); class names and counts drawn when cells are large enough."""
    from PIL import Image, ImageDraw

    m = torch.tensor(confusion, dtype=torch.float64)
    share = m / m.sum(1, keepdim=True).clamp_min(1)
    n = len(classes)
    cell = max(1, min(40, max_side // max(1, n)))
    margin = 40 if cell >= 16 else 0
    img = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(img)
    for i in range(n):
        for j in range(n):
            s = float(share[i, j])
            color = (int(255 - 247 * s), int(255 - 207 * s), int(255 - 148 * s))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
            if margin and m[i, j] > 0:
                draw.text((x + 2, y + cell // 3), str(int(m[i, j])), fill="white" if s > 0.5 else "black")
    if margin:
        for k, name in enumerate(classes):
            draw.text((margin + k * cell + 2, margin // 3), name[:5], fill="black")  # predicted, on top
            draw.text((2, margin + k * cell + cell // 3), name[:5], fill="black")  # true, on the left
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def report_lines(result: dict) -> list[str]:
    lines = [f"eval: {result['weights']} ({result['model']}) on {result['data']}: {result['count']} images",
             f"  top-1 {result['top1']:.2f}%   top-5 {result['top5']:.2f}%", "  per class (top-1, correct/count):"]
    lines += [f"    {name:>12}  {c['top1']:6.2f}%  {c['correct']}/{c['count']}" for name, c in result["per_class"].items()]
    return lines


def default_out(src: Path) -> Path:
    """<run>/eval for a run folder or a weights file beside its config; <run>/eval/step_NNNNNNNN for a checkpoint
    folder (<run>/checkpoints/step_NNNNNNNN), so that it neither lands among the checkpoints nor overwrites the
    run's own eval."""
    from distvit.checkpoint import io as ckio

    if src.is_dir() and (src / ckio.META).is_file():
        return src.parent.parent / "eval" / src.name
    return (src if src.is_dir() and (src / "config.yaml").is_file() else src.parent) / "eval"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distvit eval", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                   help="a run folder, a checkpoint folder, or a weights file with the run's config")
    p.add_argument("--data", default=None, metavar="PATTERN", help="shards to evaluate (default: the run's data.val)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.add_argument("--out", default=None, help="folder for eval.json and confusion.png (default: <run>/eval)")
    args = p.parse_args(argv)
    try:
        run = load_run(args.checkpoint, args.device, data=args.data)
        result = evaluate(run, args.data, args.batch_size, args.workers)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # ConfigError, DataError, WeightsMismatchError
        print(f"distvit: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out(Path(args.checkpoint))
    png = confusion_png(result["confusion"], result["classes"], out / "confusion.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print("\n".join(report_lines(result) + [f"  confusion matrix: {png}", f"  numbers: {out / 'eval.json'}"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
