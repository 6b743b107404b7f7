"""A stable name for the newest run: `runs/demo_digits -> demo_digits-20261202-043000`.

`make demo` starts a new run folder each time (nothing the user saved is overwritten) and then
points `runs/demo_digits` at it, so the README's next commands and configs that read the demo's
weights (`configs/deit_digits_distill.yaml`, `configs/finetune_digits.yaml`) work right after it:

    python -m distvit.run_link runs/demo_digits-20261202-043000 runs/demo_digits

The link is replaced atomically (a new link, then rename). A real folder already at the link's
path (a run started with `--set run.name=demo_digits`) is left alone: it is what the commands read.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def link_run(run_dir: str | Path, link: str | Path) -> str:
    """Point `link` at `run_dir` (relative to the link's folder); returns one line saying what happened."""
    run_dir, link = Path(run_dir), Path(link)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); did the training run start?")
    if run_dir.resolve() == link.resolve() and not link.is_symlink():
        return f"run folder: {run_dir}"
    if link.exists() and not link.is_symlink():
        return (f"run folder: {run_dir} ({link} is a run folder of its own and was left as it is; "
                f"use {run_dir} in the commands below)")
    target = os.path.relpath(run_dir.resolve(), link.parent.resolve())
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, link)
    return f"run folder: {run_dir} (linked as {link}, which the README's next commands use)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m distvit.run_link RUN_DIR LINK", file=sys.stderr)
        return 2
    try:
        print(link_run(*argv), flush=True)
    except FileNotFoundError as exc:
        print(f"distvit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
