"""A build lock left by a killed process does not hang the next run (distvit/parallel/op_load.py).

torch's JIT loader creates a `lock` file in the op's build folder on every load and deletes it after;
a rank killed in between left it, and every later `deepspeed.init_distributed` on the machine waited
on it forever (seen in this project's own test runs). The test plants such a file in a copy of the
built op (TORCH_EXTENSIONS_DIR, so the machine's own cache is not touched) and loads it in a fresh
process: through op_load it returns, says so in one line, and the file is gone; DeepSpeed's own load
alone still waits on it (the control, cut by a timeout).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from trainer_helpers import ROOT, run_env

LOAD = "from distvit.parallel import op_load; op_load.preload(op_load.SHM_COMM); print('loaded')"
PLAIN = ("from deepspeed.accelerator import get_accelerator; "
         "get_accelerator().create_op_builder('ShareMemCommBuilder').load(); print('loaded')")
FOLDER = "from distvit.parallel import op_load; print(op_load.build_folder('deepspeed_shm_comm'))"


def _py(code: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def built_op(tmp_path_factory):
    """The shm op built in the machine's cache (once; later runs reuse it), copied to a folder of ours."""
    env = run_env(DS_ACCELERATOR="cpu")
    env.pop("TORCH_EXTENSIONS_DIR", None)
    proc = _py(LOAD, env, 600)
    if proc.returncode != 0 or "loaded" not in proc.stdout:
        pytest.skip(f"DeepSpeed's shm op does not build here: {proc.stderr.strip()[-300:]}")
    src = _py(FOLDER, env, 120).stdout.strip()
    root = tmp_path_factory.mktemp("torch_extensions")
    shutil.copytree(src, root / "deepspeed_shm_comm", copy_function=shutil.copy2)  # mtimes kept: no rebuild
    (root / "deepspeed_shm_comm" / "lock").unlink(missing_ok=True)
    return root


def test_a_stale_build_lock_is_removed_and_the_op_loads(built_op):
    env = run_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(built_op))
    lock = built_op / "deepspeed_shm_comm" / "lock"
    lock.touch()  # what a rank killed inside the load leaves
    proc = _py(LOAD, env, 120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("loaded"), proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distvit:")]
    assert lines == [f"distvit: removed a stale build lock {lock} (left by a process killed while it loaded "
                     "DeepSpeed's deepspeed_shm_comm op; every later run would have waited on it)"]
    assert not lock.exists()
    # no lock: nothing to say
    proc = _py(LOAD, env, 120)
    assert proc.returncode == 0 and "distvit:" not in proc.stderr, proc.stderr[-2000:]


def test_without_op_load_the_same_lock_hangs_the_load(built_op):
    """The control: DeepSpeed's load alone waits on the planted file (what every run did before)."""
    env = run_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(built_op))
    lock = built_op / "deepspeed_shm_comm" / "lock"
    lock.touch()
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            _py(PLAIN, env, 20)
    finally:
        lock.unlink(missing_ok=True)
    assert os.path.isdir(built_op / "deepspeed_shm_comm")
