"""`distvit data ...`: write shards from a source, verify shards.

    distvit data write digits --out data/digits
    distvit data write imagefolder ~/photos --out data/photos --samples-per-shard 2000
    distvit data write csv list.csv --out data/list --shard-size 500MB
    distvit data verify 'data/digits/train-*.tar' --world 8 --workers 4 --strict
    distvit data verify 'other/shard-{0000..0099}.tar' --write-manifest other --split train
"""
from __future__ import annotations

import argparse
import json
import sys

from distvit.data.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distvit data", description="Write and check webdataset shards.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{write,verify}")

    w = sub.add_parser("write", help="write train/val shards and dataset.json from a source",
                       description="Write {key}.png|jpg|webp + {key}.cls + {key}.json shards (train-*.tar, val-*.tar) "
                                   "and a dataset.json manifest (written last). Sources: digits (built in), "
                                   "imagefolder DIR, csv FILE.")
    src = w.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", required=True, help="output folder (created if missing)")
        size = sp.add_mutually_exclusive_group()
        size.add_argument("--samples-per-shard", type=int, default=None, metavar="N",
                          help="samples per shard (default: 500 for digits, 1000 otherwise)")
        size.add_argument("--shard-size", default=None, metavar="SIZE",
                          help="start a new shard after this many bytes, e.g. 500MB or 1GB")
        sp.add_argument("--overwrite", action="store_true", help="replace shards and manifest already in --out")
        sp.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = src.add_parser("digits", help="sklearn's 8x8 digits, 80/20 seeded split (no download)")
    common(d)
    d.add_argument("--classes", type=int, default=10, metavar="N", help="keep the digits 0..N-1 (default 10: all)")
    for name, what in (("imagefolder", "a folder with one subfolder per class, or train/ and val/ holding those"),
                       ("csv", "a CSV of path,label[,split] rows; paths relative to the CSV")):
        sp = src.add_parser(name, help=what)
        sp.add_argument("path", help=what)
        common(sp)
        sp.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of samples for val when the source has no split (default 0.1; it says so)")
        sp.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes writing shards in parallel (default 1); memory stays flat in dataset size")

    v = sub.add_parser("verify", help="read shards as training does; report counts, split and bad samples",
                       description="Decode every sample of the shards (as the loader does) and report samples, "
                                   "classes, samples per rank/worker for --world x --workers, bad samples "
                                   "(shard, key, reason) and decode throughput.")
    v.add_argument("pattern", help="shards: path, brace pattern 'x-{000000..000009}.tar', glob, or URL")
    v.add_argument("--world", type=int, default=1, help="data-parallel ranks to show the split for (default 1)")
    v.add_argument("--workers", type=int, default=1, help="loader workers per rank (default 1)")
    v.add_argument("--batch-size", type=int, default=64, help="per-rank batch size for the split (default 64)")
    v.add_argument("--in-chans", type=int, choices=(1, 3), default=3, help="decode as grayscale (1) or RGB (3)")
    v.add_argument("--manifest", default=None, help="dataset.json to check against (default: beside the shards)")
    v.add_argument("--strict", action="store_true", help="exit 1 when any bad sample or manifest mismatch is found")
    v.add_argument("--write-manifest", default=None, metavar="DIR",
                   help="write (or update) DIR/dataset.json from what was read, e.g. for shards from other tools")
    v.add_argument("--split", default="train", help="split name for --write-manifest (default train)")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")
    v.add_argument("--allow-pipe", action="store_true",
                   help="allow pipe:CMD shard URLs (they run CMD in a shell; only for commands you trust)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _write(args) -> int:
    from distvit.data import write

    kw = dict(overwrite=args.overwrite, show_progress=not args.no_progress, seed=args.seed)
    if args.shard_size:
        kw["shard_bytes"] = write.parse_size(args.shard_size)
        kw["samples_per_shard"] = 1 << 40
    elif args.samples_per_shard is not None:  # 0 is refused, not taken as "the default"
        if args.samples_per_shard < 1:
            raise DataError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}; "
                            f"give a sample count per shard, or --shard-size (e.g. 500MB)")
        kw["samples_per_shard"] = args.samples_per_shard
    if args.source == "digits":
        path = write.write_digits(args.out, classes=args.classes, **kw)
    elif args.source == "imagefolder":
        path = write.write_imagefolder(args.path, args.out, val_fraction=args.val_fraction, workers=args.workers, **kw)
    else:
        path = write.write_csv(args.path, args.out, val_fraction=args.val_fraction, workers=args.workers, **kw)
    manifest = json.loads(path.read_text())
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s): {args.out}/{info['pattern']}")
    print(f"classes: {manifest['num_classes']}, image size: {manifest['image_size']}, channels: {manifest['channels']}, "
          f"mean {manifest['mean']}, std {manifest['std']}")
    print(f"manifest: {path}")
    return 0


def _verify(args) -> int:
    from distvit.data.verify import verify, write_manifest_for

    if args.world < 1 or args.workers < 0 or args.batch_size < 1:
        raise DataError("--world and --batch-size must be >= 1, --workers >= 0")
    report = verify(args.pattern, world=args.world, workers=args.workers, batch_size=args.batch_size,
                    manifest_path=args.manifest, in_chans=args.in_chans, progress=not args.no_progress,
                    allow_pipe=args.allow_pipe)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        _print_report(report)
    if args.write_manifest:  # refuses (DataError, exit 2) when no sample gave a class
        print(f"manifest written: {write_manifest_for(report, args.write_manifest, args.split)}")
    return 1 if args.strict and report.problems else 0


def _print_report(report) -> None:
    d = report.to_dict()
    print(f"shards: {d['shards']}   samples: {d['samples']} ({d['good']} good, {d['bad']} bad)   "
          f"manifest: {d['manifest'] or 'none'}")
    print(f"classes: {len(d['classes'])}  " + " ".join(f"{k}:{v}" for k, v in list(d["classes"].items())[:20])
          + (" ..." if len(d["classes"]) > 20 else ""))
    split = d["split"] or {}
    if "error" in split:
        print(f"split: {split['error']}")
    elif split:
        print(f"split over {split['world']} rank(s) x {split['workers']} worker(s), batch {split['batch_size']}: "
              f"{split['steps_per_epoch']} steps per epoch, {split['dropped_per_epoch']} samples dropped per epoch")
        for rank, quotas in enumerate(split["samples_per_rank_worker"]):
            print(f"  rank {rank}: {sum(quotas)} samples (workers: {', '.join(map(str, quotas))})")
    print(f"decode throughput: {d['images_per_s']} images/s (one process)")
    problems = d["problems"]
    print(f"problems: {len(problems)}" + ("" if problems else " (none)"))
    for line in problems[:50]:
        print(f"  {line}")
    if len(problems) > 50:
        print(f"  ... and {len(problems) - 50} more (use --json for all)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _write(args) if args.command == "write" else _verify(args)
    except (DataError, ValueError, OSError) as exc:
        print(f"distvit data: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
