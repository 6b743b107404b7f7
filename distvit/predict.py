"""`distvit predict`: the top-k classes of image files, named from the dataset manifest, one process.

    distvit predict --checkpoint runs/demo_digits --top-k 3 img1.png img2.png

Each image goes through the run's own eval preprocessing (its config.yaml: size, channels, crop,
normalisation), as `distvit eval` and the trainer's validation do (distvit/inference.py).
"""
from __future__ import annotations

import argparse
import sys

import torch

from distvit.inference import LoadedRun, load_run


@torch.no_grad()
def predict(run: LoadedRun, paths: list[str], top_k: int = 5, batch_size: int = 64) -> list[list[tuple[str, float]]]:
    """For each image, [(class name, probability)] best first."""
    from PIL import Image

    k = min(top_k, len(run.classes))
    out = []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            try:
                with Image.open(path) as img:
                    img.load()
                    images.append(img.copy())
            except (OSError, ValueError) as exc:
                raise ValueError(f"image {path!r} cannot be read ({type(exc).__name__}: {exc}); "
                                 "give PNG/JPEG/WebP files") from None
        probs = run.logits(run.preprocess(images)).softmax(-1).cpu()
        values, indices = probs.topk(k, -1)
        out += [[(run.classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distvit predict", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                   help="a run folder, a checkpoint folder, or a weights file with the run's config")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("images", nargs="+", metavar="IMAGE")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    try:
        run = load_run(args.checkpoint, args.device)
        results = predict(run, args.images, args.top_k)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"distvit: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    for path, top in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{name} ({prob:.3f})" for name, prob in top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
