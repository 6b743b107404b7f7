"""`distvit` command line: one console script, one subcommand per job.

    distvit train --config configs/demo_digits.yaml [--set optim.lr=3e-3 ...] [--resume auto]
    distvit torchrun --nproc-per-node 2 launch/train.py --config ...   # torchrun, failures in one line
    distvit data write digits --out data/digits
    distvit data verify 'data/digits/train-{000000..000003}.tar'
    distvit ckpt inspect runs/demo_digits/checkpoints
    distvit generate --checkpoint runs/aim_digits --prompt 'data/digits/val-*.tar' --prefix-patches 8 --out gen
"""
from __future__ import annotations

import argparse
import sys

from distvit import __version__


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distvit train",
        description="Train a vision transformer (run under deepspeed, torchrun, accelerate launch, mpirun, srun or alone).",
    )
    p.add_argument("--config", "-c", default="demo_digits",
                   help="YAML config: a path, or a name under configs/ (default: demo_digits)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set optim.lr=3e-4 --set data.batch_size=64")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': continue from the newest complete checkpoint of the run folder; or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # DeepSpeed's launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def train(argv: list[str] | None = None) -> int:
    """`distvit train` and launch/train.py: every error ends as one line (distvit/errors.py)."""
    from distvit import errors

    return errors.guard("distvit", _train, argv)


def _train(argv: list[str] | None) -> int:
    from distvit.config import load_config

    args = train_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:  # as this launch would run it: world size from the launcher's env, device from run.device
        from distvit.config.resolve import print_config

        print(print_config(cfg), end="")
        return 0
    from distvit.engine.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume)
    summary = trainer.fit()
    if trainer.is_main and not summary.get("nothing_to_train"):  # else the trainer said so in one line
        print_summary(summary)
    from distvit.parallel import mesh as ddist

    ddist.destroy()
    return 0 if summary["status"] in ("finished", "preempted") else 1


class _QuietAgent:
    """Drops the elastic agent's own log lines about a failed or stopped rank: the one line below says it."""

    DROPPED = ("failed (exitcode", "Sending process", "Received ", "Got termination signal")

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.DROPPED)


def torchrun(argv: list[str]) -> int:
    """`distvit torchrun ...`: torchrun itself (torch.distributed.run in this process, the same options and
    signal handling: SIGTERM/SIGINT go to every rank), except that a failed rank ends it with one line
    naming the rank and its exit code, under the rank's own error line, instead of torchrun's ChildFailedError
    traceback (~25 lines). Exit code: the failed rank's (2 for a user error), 128+N for signal N."""
    from distvit import errors

    return errors.guard("distvit torchrun", _torchrun, argv)


def _torchrun(argv: list[str]) -> int:
    import logging
    import signal

    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from distvit import errors

    if not errors.debug():
        quiet = _QuietAgent()
        for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
            logging.getLogger(name).addFilter(quiet)
    try:
        torch_run.main(argv)
    except ChildFailedError as exc:
        if errors.debug():
            print(exc, file=sys.stderr)

        def code(f) -> str:
            return f"exited with code {f.exitcode}" if f.exitcode >= 0 else f"was killed by {f.signal_name()}"

        # timestamps are whole seconds: a rank that exited by itself comes before one torchrun then stopped
        order = sorted(exc.failures.items(), key=lambda kv: (kv[1].timestamp, kv[1].exitcode <= 0, kv[0]))
        (rank, first), rest = order[0], order[1:]
        stopped = [r for r, f in rest if f.exitcode == -signal.SIGTERM]
        others = [f"rank {r} {code(f)}" for r, f in rest if r not in stopped]
        print(f"distvit torchrun: error: rank {rank} {code(first)} (the error above says why)"
              + "".join(f", {o}" for o in others)
              + (f"; torchrun then stopped rank(s) {', '.join(map(str, stopped))}" if stopped else "")
              + "; DISTVIT_DEBUG=1 prints the tracebacks", file=sys.stderr, flush=True)
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode if first.exitcode < 0 else 1
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        then = {"SIGTERM": " (a training rank saves a checkpoint after its step and exits)",
                "SIGINT": " (a rank stops at once, without saving)"}.get(name, "")
        print(f"distvit torchrun: stopped by {name}, which every rank was sent{then}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


def print_summary(summary: dict) -> None:
    top1 = summary.get("final_top1")
    print(
        f"done: {summary['status']} after {summary['steps']} steps ({summary['epochs']:.2f} epochs) in {summary['wall_s']:.1f} s"
        + (f"; val top-1 {top1:.2f}% (best {summary['best_top1']:.2f}%)" if top1 is not None else "")
        + (f"; val next-patch MSE {summary['final_mse']:.4f}" if summary.get("final_mse") is not None else "")
        + f"; {summary['img_per_s']:.0f} img/s"
        + (f", {summary['tokens_per_s']:.0f} tokens/s" if summary.get("tokens_per_s") else "") + "\n"
        f"  checkpoint: {summary['checkpoint']}\n"
        + (f"  weights:    {summary['weights']}\n" if summary.get("weights") else "")
        + f"  logs:       {summary['run_dir']}/metrics.csv, {summary['run_dir']}/tensorboard, {summary['run_dir']}/summary.json",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "train": ("train a model (see `distvit train --help`)", train),
        "torchrun": ("torchrun (same options) whose failed rank ends it in one line, e.g. distvit torchrun "
                     "--nproc-per-node 2 launch/train.py --config ...", torchrun),
        "data": ("write, verify and inspect webdataset shards", lambda a: _lazy("distvit.data.cli", a)),
        "ckpt": ("inspect, consolidate, reshape, verify and prune checkpoints", lambda a: _lazy("distvit.checkpoint.cli", a)),
        "eval": ("top-1/top-5, per-class accuracy, confusion matrix of a run", lambda a: _lazy("distvit.evaluate", a)),
        "predict": ("top-k classes of image files", lambda a: _lazy("distvit.predict", a)),
        "generate": ("complete images patch by patch with an autoregressive run (KV cache)",
                     lambda a: _lazy("distvit.generate", a)),
    }
    parser = argparse.ArgumentParser(prog="distvit", description="Distributed training of vision transformers.")
    parser.add_argument("--version", action="version", version=f"distvit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        parser.parse_args(argv)
    if argv[0] not in commands:
        parser.parse_args(argv)  # prints the error with the valid choices
        return 2
    if argv[0] in ("train", "torchrun"):
        return commands[argv[0]][1](argv[1:])
    from distvit import errors

    return errors.guard(f"distvit {argv[0]}", commands[argv[0]][1], argv[1:])


def _lazy(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(argv)


if __name__ == "__main__":
    sys.exit(main())
