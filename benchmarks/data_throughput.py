"""Training-loader throughput: distvit.data vs a plain webdataset pipeline, same shards, same work.

Both read the same JPEG shards and do the same per-sample work: PIL decode to RGB, random resized
crop (distvit's TrainTransform: one PIL resize with a crop box), flip, to float and normalize, batch.
The peer is webdataset's own idiom:

    WebDataset(urls, shardshuffle, split_by_node, split_by_worker) -> shuffle(buffer) -> decode("pil")
      -> to_tuple("jpg", "cls") -> map_tuple(transform, int) -> batched(B) -> WebLoader(num_workers=W)

Ours is build_train_loader(...) with the same batch size, buffer and workers. Each timing covers one
full epoch from creating the iterator (worker start-up included for both); the best of --repeats runs
is kept, and the two loaders alternate so background load hits both alike.

    python benchmarks/data_throughput.py                 # 0, 1, 2 workers
    python benchmarks/data_throughput.py --workers 0,2,4 --samples 8192 --out benchmarks/results/x.jsonl

One JSON line per worker count: images/s of both and the ratio ours / webdataset (goal >= 1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--samples", type=int, default=2048, help="training samples in the synthetic shards")
    p.add_argument("--shard-samples", type=int, default=256)
    p.add_argument("--src-size", type=int, default=128, help="side of the stored JPEG images")
    p.add_argument("--img-size", type=int, default=96, help="side of the crops the loaders produce")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--buffer", type=int, default=512, help="shuffle buffer of both loaders")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shards", default=None, help="use these shards (pattern) instead of writing synthetic ones")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return p.parse_args()


def make_shards(root: str, args) -> str:
    from distvit.data.synthetic import write_synthetic

    sizes = [args.shard_samples] * (args.samples // args.shard_samples)
    if args.samples % args.shard_samples:
        sizes.append(args.samples % args.shard_samples)
    write_synthetic(root, shard_sizes=sizes, size=args.src_size, channels=3, fmt="jpg", num_classes=100)
    return f"{root}/train-*.tar"


def ours(pattern: str, args, workers: int):
    from distvit.data import DataConfig, build_train_loader

    cfg = DataConfig(train=pattern, val=None, batch_size=args.batch, num_workers=workers, img_size=args.img_size,
                     in_chans=3, shuffle_buffer=args.buffer, hflip=0.5, train_crop_scale=[0.08, 1.0],
                     interpolation="bilinear", pin_memory=False)
    return build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)


def peer(pattern: str, args, workers: int):
    import webdataset as wds

    from distvit.data.loader import resolve_stats
    from distvit.data.config import DataConfig
    from distvit.data.manifest import read_manifest
    from distvit.data.shards import expand_pattern
    from distvit.data.transforms import TrainTransform, sample_rng

    urls = expand_pattern(pattern)
    mean, std = resolve_stats(DataConfig(in_chans=3), read_manifest(pattern))
    crop = TrainTransform(args.img_size, 3, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, "bilinear")
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    counter = iter(range(1 << 62))

    def transform(img):
        arr = crop(img, sample_rng(0, 0, "", str(next(counter))))
        return (torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0 - mean_t) / std_t

    ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker, empty_check=False, seed=0)
          .shuffle(args.buffer)
          .decode("pil")
          .to_tuple("jpg", "cls")
          .map_tuple(transform, int)
          .batched(args.batch, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


def time_epoch(loader) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for images, labels in loader:
        n += images.shape[0]
    return time.perf_counter() - start, n


def main():
    import warnings

    # np.asarray(PIL image) is read-only; torch warns once per worker when wrapping it. Harmless here.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    args = parse_args()
    torch.set_num_threads(1)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        pattern = args.shards or make_shards(tmp, args)
        for workers in [int(w) for w in args.workers.split(",")]:
            best = {"ours": 0.0, "webdataset": 0.0}
            images = {}
            for _ in range(args.repeats):
                for name, make in (("ours", ours), ("webdataset", peer)):
                    seconds, n = time_epoch(make(pattern, args, workers))
                    best[name] = max(best[name], n / seconds)
                    images[name] = n
            line = {
                "bench": "data_throughput", "workers": workers, "ours_img_s": round(best["ours"], 1),
                "webdataset_img_s": round(best["webdataset"], 1), "ratio": round(best["ours"] / best["webdataset"], 3),
                "images_per_epoch": images, "batch": args.batch, "src_size": args.src_size, "img_size": args.img_size,
                "shuffle_buffer": args.buffer, "cpus": os.cpu_count(), "machine": platform.node() or "unknown",
            }
            lines.append(json.dumps(line))
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
