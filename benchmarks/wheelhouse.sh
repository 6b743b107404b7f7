#!/usr/bin/env bash
# make wheelhouse: on a machine WITH a package registry, write every wheel a GPU machine without
# one lacks into one folder (default ./wheelhouse, at most 60 MB), for `make gpu-check` there.
#
# The GPU machine is assumed to bring Python 3.12 (x86_64, glibc >= 2.17), its own CUDA torch,
# triton, timm, accelerate and mpi4py, and what those need: numpy, pillow, pyyaml, safetensors,
# tqdm, psutil (make gpu-check's preflight names anything missing, in one line, before GPU time).
# It lacks DeepSpeed (an sdist on PyPI: its wheel is built here, pure Python, DS_BUILD_OPS=0, ops
# JIT-built there by ninja + nvcc), webdataset, pydantic (+ its binary core), pytest-timeout (the
# per-test limit of the CUDA tests; pytest itself too, where it is missing) and their small deps,
# einops (DeepSpeed's, which none of the above brings) and packaging (pytest wants >= 24) included.
# Not scikit-learn (scipy + scikit-learn: 44 MB of cp312 wheels needing glibc 2.28): the digits
# shards the CUDA tests train on are written here instead, into OUT/digits (5 MB), and make
# gpu-check hands them to the tests (DISTVIT_DIGITS_DIR). Not sybil: the gpu run does not collect
# tests/test_docs.py.
# Versions are the ones this checkout's venv runs its tests with (read from it, not hard-coded).
#
# usage: benchmarks/wheelhouse.sh [PYTHON] [OUT]   (PYTHON: the venv python that holds the pins)
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${2:-wheelhouse}
TARGET_PY=${WHEELHOUSE_PYTHON_VERSION:-3.12}
LIMIT_MB=60
ROOT=$(cd "$(dirname "$0")/.." && pwd)

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# Pure-Python packages: any platform. Binary ones: the target's interpreter and manylinux x86_64.
PURE=(webdataset braceexpand pydantic annotated-types typing-inspection typing-extensions hjson py-cpuinfo einops
      pytest pytest-timeout pluggy iniconfig pygments packaging)
BINARY=(pydantic-core msgpack ninja)

mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pins=()
for p in "${PURE[@]}"; do pins+=("$p==$(version "$p")"); done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$OUT" "${pins[@]}"

bins=()
for p in "${BINARY[@]}"; do bins+=("$p==$(version "$p")"); done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$TARGET_PY" --implementation cp --abi "cp${TARGET_PY/./}" --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$OUT" "${bins[@]}"

# DeepSpeed ships as an sdist: build a pure-Python wheel, no ops compiled (the GPU machine JIT-builds
# the ones it uses). Built in an isolated env without torch, so nothing of this machine's torch leaks in.
ds="deepspeed==$(version deepspeed)"
if ! ls "$OUT"/deepspeed-"$(version deepspeed)"-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary deepspeed -w "$tmp" "$ds"
    mv "$tmp"/deepspeed-*.whl "$OUT"/
fi

# The demo's digits (scikit-learn's 8x8 digits as shards, the same seeded split as everywhere): the
# CUDA tests' training data, so the GPU machine needs no scikit-learn.
if [[ ! -f "$OUT/digits/dataset.json" ]]; then
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cpu "$PY" -c \
        'import sys; from distvit.data import write_digits; write_digits(sys.argv[1], overwrite=True)' "$OUT/digits"
fi

# One version of each package only (an older download left in OUT would stop the offline install).
"$PY" - "$OUT" <<'PY'
import collections, pathlib, sys
seen = collections.defaultdict(list)
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    seen[w.name.split("-")[0].lower().replace("_", "-")].append(w.name)
dups = {k: v for k, v in seen.items() if len(v) > 1}
if dups:
    sys.exit(f"wheelhouse: several versions of {sorted(dups)} in {sys.argv[1]}: {dups}; delete the folder and run make wheelhouse again")
PY

size_kb=$(du -sk "$OUT" | cut -f1)
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels and the digits shards, $((size_kb / 1024)) MB ($size_kb KiB) in $OUT/"
if (( size_kb > LIMIT_MB * 1024 )); then
    echo "wheelhouse: $OUT/ is over the ${LIMIT_MB} MB limit" >&2
    exit 1
fi
