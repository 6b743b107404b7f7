"""`distvit ckpt` (also `python -m distvit.checkpoint`): look after a run's checkpoints.

    distvit ckpt inspect runs/demo/checkpoints            # step, world size, ZeRO stage, data cursor, sizes
    distvit ckpt verify runs/demo/checkpoints/step_00000100
    distvit ckpt consolidate runs/demo/checkpoints --out model.safetensors   # --max-shard-size 5GB: shards + index past it
    distvit ckpt prune runs/demo/checkpoints --keep 2
    distvit ckpt reshape runs/demo/checkpoints --out runs/demo_8ranks/checkpoints   # resume on another world size

DIR may be a checkpoints folder (its newest complete checkpoint is used) or one step_* folder.
No verb runs code from a checkpoint: torch files are read with weights_only=True, and one that
holds anything but data is refused, naming the file (checkpoint/safe_load.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from distvit.checkpoint import io as ckio
from distvit.checkpoint import reshape as ckreshape
from distvit.checkpoint import safe_load
from distvit.checkpoint import state as ckstate


class CheckpointError(RuntimeError):
    pass


def resolve_tag_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path}: no such folder; give a run's checkpoints folder or one of its step_* folders")
    if ckio.step_of(p.name) is not None:
        return p
    found = ckio.find_resume(p, log=lambda msg: print(msg, file=sys.stderr))
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (a step_* folder with {ckio.COMPLETE}) in this folder")
    return found


def verify(tag_dir: Path) -> list[str]:
    """Every file a complete checkpoint needs, present and readable; returns the problems found."""
    problems = []
    if not (tag_dir / ckio.COMPLETE).is_file():
        problems.append(f"{tag_dir / ckio.COMPLETE}: missing (the save was interrupted)")
    if not (tag_dir / ckio.META).is_file():
        return problems + [f"{tag_dir / ckio.META}: missing"]
    try:
        meta = ckio.read_meta(tag_dir)
    except (OSError, ValueError, TypeError) as exc:  # not JSON, or not distvit's fields
        return problems + [f"{tag_dir / ckio.META}: unreadable ({exc})"]
    world, stage = meta.world_size, meta.zero_stage
    if meta.is_reshaped:
        return problems + _check_files(tag_dir, _reshaped_files(tag_dir, meta))
    expected = [name for r in range(world) for name in ckio.rank_state_files(r)]
    shards = meta.zero_shards  # ZeRO partitions over dp x sp
    if stage == 3:
        expected += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(shards)]
    else:
        expected.append("mp_rank_00_model_states.pt")
    if stage >= 1:
        # bf16 optimizer states are named bf16_* (always under ZeRO-1/2; under ZeRO-3 with CPU offload)
        for r in range(shards):
            name = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
            bf16 = meta.precision == "bf16" and (stage < 3 or (tag_dir / f"bf16_{name}").is_file())
            expected.append(f"bf16_{name}" if bf16 else name)
    return problems + _check_files(tag_dir, expected)


def _check_files(tag_dir: Path, names: list[str]) -> list[str]:
    """Each expected file present and readable as data, then every other torch file in the
    folder read safely too, then the manifest in COMPLETE (sizes and sha256)."""
    problems = []
    for name in names:
        f = tag_dir / name
        if not f.is_file():
            problems.append(f"{f}: missing")
            continue
        problem = _check_file(f)
        if problem:
            problems.append(problem)
    for f in safe_load.torch_files(tag_dir):
        if str(f.relative_to(tag_dir)) not in names:
            problem = _check_file(f)
            if problem:
                problems.append(problem)
    reported = {line.split(": ")[0] for line in problems}
    return problems + [line for line in ckio.manifest_problems(tag_dir, hashes=True)
                       if line.split(": ")[0] not in reported]


def _check_file(f: Path) -> str | None:
    try:
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt") as handle:
                list(handle.keys())
        else:
            safe_load.load(f, mmap=True)
    except safe_load.CheckpointFileError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure to read is what we report
        return f"{f}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return None


def _reshaped_files(tag_dir: Path, meta: ckio.CheckpointMeta) -> list[str]:
    """A reshaped checkpoint: the shared state, the source's model-states file(s), and (universal)
    every parameter's whole fp32 weights and Adam moments under zero/."""
    names = ckstate.files_of(ckstate.COMMON)
    if meta.zero_stage == 3:
        names += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(meta.reshaped_from.dp_size)]
    else:
        names.append("mp_rank_00_model_states.pt")
    if meta.universal:
        names.append(f"{ckreshape.UNIVERSAL_DIR}/optimizer_state.pt")
        first_missing = [n for n in names if not (tag_dir / n).is_file()]
        if not first_missing:  # the parameter list comes from the model-states file
            names += ckreshape.expected_universal_files(tag_dir)
    return names


def _summary(data: dict | None) -> dict | None:
    """A reshaped checkpoint's data state is every old dp rank's cursor (re-split on load): summed up."""
    if not data or data.get("kind") != "reshaped":
        return data
    first = data["ranks"][0]
    return {"kind": "reshaped", "epoch": first["epoch"], "old_dp_ranks": len(data["ranks"]),
            "old_step_in_epoch": first["step"], "old_epoch_steps": first.get("epoch_steps", first["steps_per_epoch"])}


def inspect(tag_dir: Path) -> dict:
    meta = ckio.read_meta(tag_dir)
    sizes = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
    reshaped = meta.is_reshaped
    # Complete: the marker, every file at the size the save wrote, every torch file readable as data.
    # A file holding code raises UnsafeCheckpointError here (the verb fails, naming it).
    problems = ckio.manifest_problems(tag_dir)
    try:
        safe_load.precheck(tag_dir)
    except safe_load.UnsafeCheckpointError:
        raise
    except safe_load.CheckpointFileError as exc:
        problems.append(str(exc))
    # A reshaped checkpoint has no per-rank state: its data state is every old dp rank's cursor.
    try:
        rank0 = ckstate.load_common(tag_dir) if reshaped else ckstate.load_rank(tag_dir, 0)
    except ckstate.StateError as exc:
        rank0 = {}
        problems.append(str(exc))
    return {
        "path": str(tag_dir), "step": meta.step, "epoch": meta.epoch,
        "world_size": "any (reshaped)" if reshaped else meta.world_size,
        "dp_size": meta.dp_size, "sp_size": meta.sp_size, "zero_stage": meta.zero_stage,
        "precision": meta.precision, "model": meta.model,
        "complete": ckio.is_complete(tag_dir) and not problems, "problems": problems,
        "data_cursor_rank0": _summary(rank0.get("data")), "reshaped_from": dataclasses.asdict(meta.reshaped_from) if reshaped else None,
        "total_bytes": sum(sizes.values()), "files": sizes, "config": meta.config,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distvit ckpt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="describe a checkpoint")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="print JSON (with the full config)")
    p = sub.add_parser("verify", help="check every expected file is present and readable")
    p.add_argument("dir")
    p = sub.add_parser("consolidate", help="merge ZeRO shards into fp32 safetensors (streamed, sharded past --max-shard-size)")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="output .safetensors path (sharded: its -0000k-of-0000n files and .index.json)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest output file, e.g. 5GB (default), 500MB, 2GiB; above it, shards and an index")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("prune", help="delete all but the newest K complete checkpoints")
    p.add_argument("dir")
    p.add_argument("--keep", type=int, required=True)
    p = sub.add_parser("reshape", help="rewrite a checkpoint so that any world size can resume it")
    p.add_argument("dir")
    p.add_argument("--out", required=True,
                   help="checkpoints folder of the run that will resume it (e.g. runs/<name>/checkpoints)")
    p.add_argument("--workers", type=int, default=1, help="processes that extract ZeRO shards (default 1)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "prune":
            if args.keep < 1:
                raise CheckpointError(f"--keep {args.keep}: must be >= 1 (prune keeps the newest K complete checkpoints); e.g. --keep 2")
            if not Path(args.dir).is_dir():
                raise CheckpointError(f"{args.dir}: no such folder; give a run's checkpoints folder, e.g. runs/<name>/checkpoints")
            removed = ckio.prune(Path(args.dir), args.keep)
            print(f"removed {len(removed)} checkpoint(s)" + "".join(f"\n  {p}" for p in removed))
            return 0
        tag_dir = resolve_tag_dir(args.dir)
        if args.cmd == "verify":
            problems = verify(tag_dir)
            for line in problems:
                print(f"bad: {line}")
            print(f"{tag_dir}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
        if args.cmd == "inspect":
            info = inspect(tag_dir)
            if args.json:
                print(json.dumps(info, indent=2, default=str))
            else:
                for key in ("path", "step", "epoch", "model", "world_size", "dp_size", "sp_size", "zero_stage",
                            "precision", "complete", "data_cursor_rank0", "reshaped_from"):
                    if key != "reshaped_from" or info[key]:
                        print(f"{key:>18}: {info[key]}")
                for line in info["problems"]:
                    print(f"{'problem':>18}: {line}")
                print(f"{'size':>18}: {info['total_bytes'] / 2**20:.1f} MiB in {len(info['files'])} files")
            return 0
        if args.cmd == "consolidate":
            from distvit.checkpoint.consolidate import check_out, consolidate

            from distvit.checkpoint.stream import parse_size

            check_out(Path(args.out), overwrite=args.overwrite)
            try:
                max_bytes = parse_size(args.max_shard_size)
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
            problems = verify(tag_dir)
            if problems:
                raise CheckpointError(f"{tag_dir} is not a complete checkpoint: {problems[0]}")
            out = consolidate(tag_dir, Path(args.out), overwrite=args.overwrite, max_shard_size=max_bytes)
            print(f"wrote {out} (fp32, from {tag_dir})")
            return 0
        if args.cmd == "reshape":
            problems = verify(tag_dir)
            if problems:
                raise CheckpointError(f"{tag_dir} is not a complete checkpoint: {problems[0]}")
            out = ckreshape.reshape(tag_dir, Path(args.out), workers=args.workers)
            source_ranks = ckio.read_meta(out).reshaped_from.world_size
            run_dir = Path(args.out).resolve().parent
            print(f"wrote {out} from {tag_dir} ({source_ranks} rank(s)); any world size resumes its weights, "
                  f"optimizer state and lr schedule, the rest of the epoch's data and the RNG:\n"
                  f"  launch/train.py ... --set run.output_dir={run_dir.parent} --set run.name={run_dir.name} --resume auto")
            return 0
    except (CheckpointError, ckreshape.ReshapeError, FileExistsError, FileNotFoundError, ValueError,
            safe_load.CheckpointFileError, ckstate.StateError, ckio.DiskFullError) as exc:
        print(f"distvit ckpt: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
