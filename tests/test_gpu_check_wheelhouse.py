"""`make wheelhouse` / `make gpu-check` (benchmarks/wheelhouse.sh, benchmarks/gpu_check.sh), checked on the CPU.

The GPU machine brings Python 3.12, its CUDA torch, triton, timm, accelerate, mpi4py and what they
need; not DeepSpeed, webdataset, pydantic, sybil, pytest-timeout or scikit-learn. So:
- what gpu_check.sh installs, with everything it requires, is in the wheelhouse or on that machine
  (read from this venv's package metadata, no network);
- the preflight names every missing module in one line and stops before any GPU step;
- `pytest -m gpu`, as gpu_check.sh runs it, collects without sybil or scikit-learn;
- the steps' time limits fit the 8 minutes the issue gives the whole run.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
WHEELHOUSE = ROOT / "benchmarks" / "wheelhouse.sh"
# What wheelhouse.sh's header assumes the GPU machine brings (distributions, normalized names).
ON_THE_GPU_MACHINE = {"torch", "triton", "timm", "accelerate", "mpi4py", "numpy", "pillow", "pyyaml",
                      "safetensors", "tqdm", "psutil"}
TOTAL_S = 8 * 60


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _bash_array(text: str, name: str) -> list[str]:
    body = re.search(rf"^{name}=\(([^)]*)\)", text, re.M | re.S)
    assert body, f"{name}=(...) not found"
    return body.group(1).split()


def _installed_by_gpu_check() -> list[str]:
    line = next(ln for ln in GPU_CHECK.read_text().splitlines() if "--find-links" in ln and "pip install" in ln)
    return line.split("'$WHEELS'", 1)[1].rstrip(";").split()


def test_the_wheelhouse_holds_everything_gpu_check_installs_and_what_that_requires():
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    text = WHEELHOUSE.read_text()
    shipped = {_norm(p) for p in _bash_array(text, "PURE") + _bash_array(text, "BINARY")} | {"deepspeed"}
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    todo, seen, lacking = [_norm(p) for p in _installed_by_gpu_check()], set(), {}
    assert {"deepspeed", "webdataset", "pydantic", "pytest", "pytest-timeout"} <= set(todo)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in shipped:
            if name not in ON_THE_GPU_MACHINE:
                lacking.setdefault(name, "installed by gpu_check.sh")
            continue
        for spec in md.requires(name) or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = _norm(req.name)
            if dep not in shipped and dep not in ON_THE_GPU_MACHINE:
                lacking.setdefault(dep, f"required by {name}")
            todo.append(dep)
    assert not lacking, f"neither in the wheelhouse nor on the GPU machine: {lacking}; add them to wheelhouse.sh"
    assert "scikit-learn" not in shipped and "sybil" not in shipped  # 44 MB / not needed: see wheelhouse.sh


def test_the_wheelhouse_ships_the_digits_the_cuda_tests_train_on():
    text = WHEELHOUSE.read_text()
    assert "write_digits" in text and '"$OUT/digits"' in text
    gpu = GPU_CHECK.read_text()
    assert "DISTVIT_DIGITS_DIR" in gpu and "$WHEELS/digits" in gpu
    assert "DISTVIT_DIGITS_DIR" in (ROOT / "benchmarks" / "vit_mfu.py").read_text()


def test_the_digits_fixture_takes_the_shipped_shards(request, monkeypatch, tmp_path):
    """What the CUDA tests get under make gpu-check (DISTVIT_DIGITS_DIR): those shards, never a write
    (which would need scikit-learn); a folder without a manifest fails naming the fix."""
    import conftest

    fixture = conftest.digits_dir.__wrapped__  # the function behind the session fixture
    shipped = tmp_path / "digits"
    shipped.mkdir()
    (shipped / "dataset.json").write_text("{}")
    monkeypatch.setenv("DISTVIT_DIGITS_DIR", str(shipped))
    assert fixture(None) == shipped
    monkeypatch.setenv("DISTVIT_DIGITS_DIR", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="holds no dataset.json; run make wheelhouse again"):
        fixture(None)


def test_the_step_limits_fit_eight_minutes():
    limits = {m.group(1): int(m.group(2))
              for m in re.finditer(r"^\s*step ([a-z0-9-]+) (\d+) ", GPU_CHECK.read_text(), re.M)}
    assert {"install", "pytest-gpu", "vit-mfu", "capacity-tokens", "capacity-largest", "goals"} <= set(limits)
    # ~20 s go to the CUDA check and the preflight's imports before the first step
    assert sum(limits.values()) <= TOTAL_S - 20, limits


def _blocking_python_path(tmp_path: Path) -> str:
    """A sitecustomize that makes BLOCK_MODULES fail to import, as on a machine without them."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, importlib.machinery, os, sys\n"
        "BLOCK = set(filter(None, os.environ.get('BLOCK_MODULES', '').split(',')))\n"
        "class _Loader(importlib.abc.Loader):\n"
        "    def create_module(self, spec):\n"
        "        raise ModuleNotFoundError(f\"No module named '{spec.name}'\", name=spec.name)\n"
        "    def exec_module(self, module):\n"
        "        pass\n"
        "class _Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        return importlib.machinery.ModuleSpec(name, _Loader()) if name.split('.')[0] in BLOCK else None\n"
        "sys.meta_path.insert(0, _Blocker())\n"
    )
    return str(tmp_path)


def _preflight(tmp_path, blocked: str, digits: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DISTVIT_DIGITS_DIR"}
    env.update(GPU_CHECK_DRY_RUN="1", GPU_CHECK_PREFLIGHT_ONLY="1", BLOCK_MODULES=blocked,
               PYTHONPATH=_blocking_python_path(tmp_path))
    wheels = tmp_path / "wheelhouse"
    if digits is not None:
        (wheels / "digits").mkdir(parents=True)
        (wheels / "digits" / "dataset.json").write_text("{}")
    return subprocess.run(["bash", str(GPU_CHECK), sys.executable, str(wheels)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_preflight_names_every_missing_module_in_one_line_and_stops(tmp_path):
    run = _preflight(tmp_path, "deepspeed,webdataset,pytest_timeout,sklearn")
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("gpu-check: missing modules:")]
    assert len(lines) == 1, run.stderr
    for module in ("deepspeed", "webdataset", "pytest_timeout", "sklearn"):
        assert f" {module} " in lines[0] or f" {module} (" in lines[0], (module, lines[0])
    assert "== gpu-check:" not in run.stdout + run.stderr  # no step ran


def test_with_the_shipped_digits_scikit_learn_is_optional(tmp_path):
    run = _preflight(tmp_path, "sklearn,sybil", digits=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "missing modules" not in run.stderr
    assert re.search(r"optional modules missing: .*sklearn", run.stderr), run.stderr
    assert "preflight only" in run.stdout


@pytest.mark.slow  # one pytest collection of the whole suite (~20 s)
def test_pytest_gpu_collects_without_sybil_or_scikit_learn(tmp_path):
    lines = GPU_CHECK.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("step pytest-gpu"))
    step = lines[at]
    while step.endswith("\\"):  # the command goes on on the next line
        at += 1
        step = step[:-1] + lines[at]
    ignores = re.findall(r"--ignore=\S+", step)
    assert "--ignore=tests/test_docs.py" in ignores, step  # sybil: the docs' blocks, none on a GPU
    env = dict(os.environ, BLOCK_MODULES="sybil,sklearn", PYTHONPATH=_blocking_python_path(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-o", "addopts=", *ignores], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "test_gpu_training.py::test_no_host_sync_on_steps_that_are_not_read_steps[cuda]" in run.stdout
