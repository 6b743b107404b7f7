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

The realistic case (--photos): ImageNet-sized JPEGs (500 x 375, quality 90) cut at random from the
photographs scikit-learn ships (load_sample_images), decoded to 224 crops. Ours sends uint8 batches
and normalises in the consuming process (on CPU here; on the GPU in training); the peer normalises
to float in its workers, as a plain webdataset + PIL pipeline does. Each line also gives ours with
RandAugment (rand-m9-mstd0.5-inc1) + mixup/cutmix (applied to each batch in the consuming process):

    python benchmarks/data_throughput.py --photos --workers 1,2 --samples 1024 \
        --out benchmarks/results/data_throughput_cpu.jsonl
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
    p.add_argument("--photos", action="store_true", help="realistic case: 500x375 JPEG crops of real photos -> 224")
    return p.parse_args()


def make_shards(root: str, args) -> str:
    from distvit.data.synthetic import write_synthetic

    sizes = [args.shard_samples] * (args.samples // args.shard_samples)
    if args.samples % args.shard_samples:
        sizes.append(args.samples % args.shard_samples)
    write_synthetic(root, shard_sizes=sizes, size=args.src_size, channels=3, fmt="jpg", num_classes=100)
    return f"{root}/train-*.tar"


def make_photo_shards(root: str, args) -> str:
    """ImageNet-sized JPEGs: 500 x 375 crops (random place and flip) of scikit-learn's sample photos."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    from distvit.data.write import DEFAULT_SHARD_BYTES, Record, write_dataset

    photos = load_sample_images().images
    rs = np.random.RandomState(0)
    recs = []
    for i in range(args.samples):
        a = photos[i % len(photos)]
        y, x = rs.randint(0, a.shape[0] - 375 + 1), rs.randint(0, a.shape[1] - 500 + 1)
        crop = a[y:y + 375, x:x + 500]
        crop = crop[:, ::-1] if rs.rand() < 0.5 else crop
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG", quality=90)
        recs.append(Record(f"p{i:06d}", buf.getvalue(), "jpg", i % 100, {}))
    sizes = [args.shard_samples] * (args.samples // args.shard_samples) + (
        [args.samples % args.shard_samples] if args.samples % args.shard_samples else [])
    write_dataset(root, {"train": recs}, name="photos", classes=[str(c) for c in range(100)], channels=3,
                  image_size=None, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], samples_per_shard=1 << 30,
                  shard_bytes=DEFAULT_SHARD_BYTES, source="sklearn sample images", shard_sizes={"train": sizes})
    return f"{root}/train-*.tar"


def ours(pattern: str, args, workers: int, auto_augment: str | None = None):
    from distvit.data import DataConfig, build_train_loader

    cfg = DataConfig(train=pattern, val=None, batch_size=args.batch, num_workers=workers, img_size=args.img_size,
                     in_chans=3, shuffle_buffer=args.buffer, hflip=0.5, train_crop_scale=[0.08, 1.0],
                     interpolation="bilinear", pin_memory=False, auto_augment=auto_augment)
    return build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)


class Mixed:
    """Ours with RandAugment in the workers and mixup/cutmix on each batch (the trainer's device step)."""

    def __init__(self, pattern, args, workers):
        from distvit.data import DataConfig
        from distvit.data.mixup import build_mixer

        self.loader = ours(pattern, args, workers, auto_augment="rand-m9-mstd0.5-inc1")
        self.mixer = build_mixer(DataConfig(mixup=0.8, cutmix=1.0), 100)

    def __iter__(self):
        for step, (images, labels) in enumerate(self.loader):
            yield self.mixer(images, labels, self.mixer.draws(0, step, 0, 0))


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
        if args.photos:
            args.img_size = 224
        pattern = args.shards or (make_photo_shards if args.photos else make_shards)(tmp, args)
        runs = (("ours", ours), ("webdataset", peer)) + ((("ours_randaug_mixup", Mixed),) if args.photos else ())
        for workers in [int(w) for w in args.workers.split(",")]:
            best = {name: 0.0 for name, _ in runs}
            images = {}
            for _ in range(args.repeats):
                for name, make in runs:
                    seconds, n = time_epoch(make(pattern, args, workers))
                    best[name] = max(best[name], n / seconds)
                    images[name] = n
            line = {
                "bench": "data_throughput", "workers": workers, "ours_img_s": round(best["ours"], 1),
                "webdataset_img_s": round(best["webdataset"], 1), "ratio": round(best["ours"] / best["webdataset"], 3),
                "images_per_epoch": images, "batch": args.batch, "src_size": args.src_size, "img_size": args.img_size,
                "shuffle_buffer": args.buffer, "cpus": os.cpu_count(), "machine": platform.node() or "unknown",
            }
            if args.photos:
                procs = max(1, workers)
                line.update(case="photos_500x375_q90", src_size="500x375", per_worker_img_s={k: round(v / procs, 1) for k, v in best.items()},
                            ours_randaug_mixup_img_s=round(best["ours_randaug_mixup"], 1),
                            randaug_mixup_cost=round(best["ours"] / best["ours_randaug_mixup"], 3),
                            pipeline="ours: uint8 workers + normalise in consumer (+draft decode); "
                                     "webdataset: decode('pil') + float normalise in workers")
            lines.append(json.dumps(line))
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
