"""Run the shell and Python blocks of the project's Markdown docs, in order, as a reader would (sybil).

Collector: sybil's Markdown lexers find every ```bash / ```python fence and every skip marker.
Markers (sybil's own syntax, invisible on GitHub), right above a block:

    <!-- skip: next "needs 8 GPUs" -->

A skipped block shows in the pytest report with its reason. Everything else is executed:
- bash blocks with `bash -e -o pipefail` (a failing line fails the block), in a sandbox copy of
  the project whose `.venv` is the venv running the tests (so `make` installs nothing) and with
  this checkout first on PYTHONPATH;
- python blocks with sybil's PythonEvaluator in one namespace per document, in the same sandbox.
Blocks of one document share the sandbox and run top to bottom (later commands use what earlier
ones made, e.g. `make demo`'s run); all documents share one sandbox, in the order of DOCS
(tests/test_docs.py), so later documents use what earlier ones made (data/digits, `make demo`'s run). `DEMO_EPOCHS` (the Makefile knob) keeps `make demo` short.

Markdown's indented code blocks are invisible to the collector, so `indented_code_blocks` finds them: a
command must sit in a fenced ```bash / ```python block (or ```text for what is not a command).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from sybil import Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
COPIED = ("Makefile", "pyproject.toml", "configs", "launch", "slurm", "benchmarks", "tests")
SANDBOX: dict[str, Path] = {}  # the sandbox every evaluator runs in (set by make_sandbox)
BLOCK_TIMEOUT_S = 1200


def make_sandbox(base: Path) -> Path:
    proj = base / "project"
    proj.mkdir()
    for name in COPIED:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, proj / name)
    os.utime(proj / "pyproject.toml", (0, 0))  # older than the venv's install stamps: make installs nothing
    (proj / ".venv").symlink_to(VENV, target_is_directory=True)
    SANDBOX["dir"] = proj
    return proj


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sandbox_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # PET_MASTER_PORT: torchrun's --master-port default (29500) would collide with other jobs on the machine
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DEMO_EPOCHS="1",
               PET_MASTER_PORT=str(_free_port()),
               PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p))
    return env


def run_bash(example) -> None:
    source = example.parsed
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", source], cwd=SANDBOX["dir"], env=sandbox_env(),
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"{example.path}:{example.line}: this block exited {proc.returncode}\n{source}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")


@contextmanager
def _in_sandbox():
    old = os.getcwd()
    os.chdir(SANDBOX["dir"])
    try:
        yield
    finally:
        os.chdir(old)


class SandboxPython(PythonEvaluator):
    def __call__(self, example):
        with _in_sandbox():
            return super().__call__(example)


def parse(doc: str):
    """The examples of one document (relative to the repo root), in order."""
    sybil = Sybil(parsers=[CodeBlockParser("bash", run_bash), CodeBlockParser("python", SandboxPython()), SkipParser()])
    return list(sybil.parse(ROOT / doc))


_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


def indented_code_blocks(doc: str) -> list[int]:
    """Line numbers (1-based) where an indented (unfenced) code block starts in one document."""
    found, fence, prev_blank, in_list = [], None, True, False
    for n, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m:
            fence = None if fence and m.group(1).startswith(fence) else (fence or m.group(1))
            prev_blank = False
            continue
        if fence:
            continue
        if line.strip() and not line.startswith((" ", "\t")):
            in_list = bool(_LIST_ITEM.match(line))
        if prev_blank and not in_list and re.match(r"^( {4}|\t)\S", line) and not line.lstrip().startswith("<!--"):
            found.append(n)
        prev_blank = not line.strip()
    return found
