#!/usr/bin/env bash
# make gpu-check: on a machine with a CUDA GPU, its own CUDA torch and NO package registry.
#   1. install what it lacks from the wheelhouse (`make wheelhouse`, run on a connected machine),
#      offline, and this checkout without its dependencies;
#   2. pytest -m gpu (every CUDA path against its reference);
#   3. the benchmarks, each side by side with its peer in the same run, into
#      benchmarks/results/*_cuda.jsonl; then the goals, met or missed by how much (goals_cuda.jsonl).
# Each step runs under its own time limit (GPU_CHECK_SCALE multiplies them all), so a step that
# hangs or overruns leaves the results of the others; the whole thing stays under 8 minutes on one
# H100/H200. Every step's exit status and seconds go to benchmarks/results/gpu_check_cuda.jsonl.
#
# Time split, the limits in seconds (480 s = 8 min in all; estimates until a GPU run's
# gpu_check_cuda.jsonl gives each step's seconds, then set each to about 1.3x what it took):
#   CUDA check + preflight  ~20  torch's CUDA, then one import of every module the run needs
#   install                  20  pip, offline, from the wheelhouse (nothing to do on a second run)
#   build-cpu-adam           40  DeepSpeed's CPU Adam, JIT-built once (g++), cached for the steps after
#   pytest-gpu              215  every CUDA path against its reference (per test: --timeout 150)
#   decode-b1, decode-b8  20+20  decode attention 4k..512k, every backend side by side
#   offload                  45  ViT-B/16 bf16, five offload modes, 4 steps each
#   vit-mfu                  30  Trainer vs plain loop vs timm, ViT-B/16 bf16
#   capacity-tokens          20  ViT-B/16 at batch 1, image size doubling, checkpointing on and off
#   capacity-largest         45  the largest ViT with interleaved offload, then without (its peer)
#   goals                     5  the issue's goals from the results above
# The largest-ViT search starts a fresh process per model (DeepSpeed start-up, ZeRO-3 partitioning
# and the host Adam state of a 0.3-1B-parameter ViT: tens of seconds each), so in 45 s it gets
# through the bottom of its ladder (ViT-L, perhaps ViT-H) with interleaved offload and rarely
# reaches the peer; a longer search: GPU_CHECK_SCALE=2, or benchmarks/gpu_capacity.py --budget-s 300.
#
# usage: benchmarks/gpu_check.sh [PYTHON] [WHEELHOUSE]
# GPU_CHECK_DRY_RUN=1: the same steps on the CPU with tiny sizes, no install, results into a
# temporary folder (checks this script on a machine without a GPU; numbers mean nothing).
# GPU_CHECK_PREFLIGHT_ONLY=1: stop after the install and the import check (exit 0: all there).
# The GPU machine has no scikit-learn: the digits shards the CUDA tests train on come from the
# wheelhouse (WHEELHOUSE/digits, written by make wheelhouse), handed to them as DISTVIT_DIGITS_DIR.
set -uo pipefail
PY=${1:-python3}
WHEELS=${2:-wheelhouse}
SCALE=${GPU_CHECK_SCALE:-1}
DRY=${GPU_CHECK_DRY_RUN:-0}
cd "$(dirname "$0")/.."
RES=benchmarks/results
DEV=cuda
if [[ $DRY == 1 ]]; then
    RES=$(mktemp -d /tmp/gpu-check-dry.XXXXXX)
    DEV=cpu
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} DS_ACCELERATOR=$DEV
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS=$RES/gpu_check_cuda.jsonl
failed=0

step() {  # step NAME SECONDS [--jsonl FILE] CMD...: run CMD under a limit, record rc and time;
          # with --jsonl, the JSON lines CMD prints are appended to FILE (everything is shown)
    local name=$1 limit=$2 out=""
    shift 2
    if [[ $1 == --jsonl ]]; then
        out=$2
        shift 2
    fi
    limit=$(awk -v s="$limit" -v k="$SCALE" 'BEGIN { printf "%d", s * k }')
    echo "== gpu-check: $name (limit ${limit}s)"
    local t0=$SECONDS rc
    if [[ -n $out ]]; then
        # awk, not `tee /dev/stderr`: that reopens a redirected stderr's file and truncates the log
        timeout -k 10 "$limit" "$@" | awk -v out="$out" '{ print; fflush() } /^\{/ { print >> out; fflush(out) }'
        rc=${PIPESTATUS[0]}
    else
        timeout -k 10 "$limit" "$@"
        rc=$?
    fi
    [[ $rc -ne 0 ]] && failed=1
    local note=""
    [[ $rc -eq 124 || $rc -eq 137 ]] && note=", \"note\": \"stopped at its ${limit}s limit\""
    printf '{"step": "%s", "rc": %d, "seconds": %d, "limit_s": %d%s}\n' "$name" "$rc" $((SECONDS - t0)) "$limit" "$note" >> "$STATUS"
    echo "== gpu-check: $name rc=$rc in $((SECONDS - t0))s"
    return 0
}

skip() {  # skip NAME WHY: a step that cannot run here, recorded (and counted as not done)
    failed=1
    echo "== gpu-check: $1 skipped: $2"
    printf '{"step": "%s", "rc": null, "seconds": 0, "limit_s": 0, "note": "skipped: %s"}\n' "$1" "$2" >> "$STATUS"
}

if [[ $DRY != 1 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: $PY sees no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine with a CUDA torch" >&2
    exit 2
fi
if [[ $DRY != 1 && ! -d "$WHEELS" ]]; then
    echo "gpu-check: no wheelhouse at '$WHEELS'; run 'make wheelhouse' on a machine with a package registry and copy the folder here (or pass WHEELHOUSE=path)" >&2
    exit 2
fi
mkdir -p "$RES"
: > "$STATUS"
if [[ $DRY == 1 && ${GPU_CHECK_PREFLIGHT_ONLY:-0} == 1 ]]; then
    trap 'rm -rf "$RES"' EXIT  # nothing of a dry preflight is worth keeping
fi

# -- 1. install, offline, then check every import before any GPU time is spent ---------------------
if [[ $DRY != 1 ]]; then
    # On through a failure: the preflight below names everything still missing, in one line.
    step install 20 bash -c "
        '$PY' -m pip install -q --disable-pip-version-check --no-index --find-links '$WHEELS' deepspeed webdataset pydantic pytest pytest-timeout
        rc=\$?
        '$PY' -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation -e . ||
            echo 'gpu-check: this checkout is not pip-installed (PYTHONPATH finds it; the distvit command is missing)'
        exit \$rc"
fi
if [[ -f "$WHEELS/digits/dataset.json" ]]; then  # the CUDA tests' data (tests/test_gpu_training.py)
    DISTVIT_DIGITS_DIR=$(cd "$WHEELS/digits" && pwd)
    export DISTVIT_DIGITS_DIR
fi

# Every module a step imports, tried in one process: all that are missing (or fail to import) in one
# line, then stop. Optional ones only cost their own rows (said in one line too).
missing_optional=$("$PY" - "$STATUS" <<'PY'
import importlib, json, os, sys, time

t0 = time.monotonic()
required = {  # module: who needs it
    "torch": "everything", "numpy": "distvit", "yaml": "distvit's configs", "PIL": "image decoding",
    "safetensors": "checkpoints", "tqdm": "distvit, DeepSpeed", "packaging": "DeepSpeed, pytest",
    "psutil": "DeepSpeed, tests", "einops": "DeepSpeed", "pydantic": "distvit's config, DeepSpeed",
    "webdataset": "distvit's data", "deepspeed": "training", "triton": "the compiled decode kernels",
    "pytest": "the CUDA tests", "pytest_timeout": "pytest --timeout", "distvit": "this checkout",
}
optional = {  # module: what runs without it
    "timm": "vit-mfu has no timm side", "flash_attn": "no flash backend, its tests and rows skip",
    "sklearn": "vit-mfu cannot write digits shards (it uses the wheelhouse's when there)",
}
if not os.environ.get("DISTVIT_DIGITS_DIR"):
    required["sklearn"] = "the CUDA tests' digits shards (no WHEELHOUSE/digits: run make wheelhouse again)"
    del optional["sklearn"]


def absent(names):
    """{module: why, '' when simply not installed} for each one that does not import."""
    out = {}
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            out[name] = "" if exc.name == name else f"it needs {exc.name}"
        except Exception as exc:  # noqa: BLE001 - a broken install counts as missing
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    return out


bad, opt = absent(required), absent(optional)
if "torch" not in bad:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
    print(f"gpu-check: torch {torch.__version__} CUDA {torch.version.cuda}, {gpu}", file=sys.stderr)
if opt:
    print("gpu-check: optional modules missing: " + "; ".join(f"{m}: {optional[m]}" for m in opt), file=sys.stderr)
row = {"step": "preflight", "rc": 2 if bad else 0, "seconds": round(time.monotonic() - t0), "limit_s": 0,
       "missing": sorted(bad), "missing_optional": sorted(opt)}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(row) + "\n")
if bad:
    print("gpu-check: missing modules: " + "; ".join(f"{m}{' (' + w + ')' if w else ''} for {required[m]}"
                                                    for m, w in bad.items())
          + "; put their wheels in the wheelhouse (make wheelhouse) and run again", file=sys.stderr)
    sys.exit(2)
print(" ".join(opt))
PY
) || exit 2
if [[ ${GPU_CHECK_PREFLIGHT_ONLY:-0} == 1 ]]; then
    echo "gpu-check: preflight only; every module the run needs imports"
    exit 0
fi

# DeepSpeed's CPU Adam (stock offload and interleaved offload use it) is JIT-built on first use:
# build it once here, so the tests and the offload benchmark find it in the torch extensions cache.
step build-cpu-adam 40 "$PY" -c 'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()'

# -- 2. the CUDA tests ----------------------------------------------------------------------------
rm -f "$RES"/gpu_tests_cuda.*
# test_docs.py runs the docs' blocks (sybil), none of them on the GPU: not collected here.
step pytest-gpu 215 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rsx --durations=15 \
    --ignore=tests/test_docs.py --junitxml="$RES/gpu_tests_cuda.xml" --timeout=150

# -- 3. benchmarks, each with its peer in the same run --------------------------------------------
for f in decode_attention offload vit_mfu gpu_capacity goals; do rm -f "$RES/${f}_cuda.jsonl"; done
if [[ $DRY == 1 ]]; then  # tiny sizes: checks the command lines, not the numbers
    DECODE=(--contexts 4096 --repeats 2) OFFLOAD=(--modes cpu,interleaved --width 64 --depth 2 --steps 1 --warmup 0)
    QUICK=(--quick)
else
    DECODE=(--repeats 10) QUICK=()
    OFFLOAD=(--model vit_base_patch16_224 --batch 32 --precision bf16 --sub-group-size 10000000 --steps 4 --warmup 2
            --modes cpu,interleaved,partial,none,zenflow)  # the goals' modes first: a cut run keeps them
fi
step decode-b1 20 "$PY" benchmarks/decode_attention.py --device $DEV --batch 1 "${DECODE[@]}" --out "$RES/decode_attention_cuda.jsonl"
step decode-b8 20 "$PY" benchmarks/decode_attention.py --device $DEV --batch 8 "${DECODE[@]}" --out "$RES/decode_attention_cuda.jsonl"
step offload 45 --jsonl "$RES/offload_cuda.jsonl" "$PY" benchmarks/offload.py --device $DEV "${OFFLOAD[@]}"
if [[ -z "${DISTVIT_DIGITS_DIR:-}" && " $missing_optional " == *" sklearn "* ]]; then  # no shipped digits, none written
    skip vit-mfu "needs the wheelhouse's digits or scikit-learn (benchmarks/vit_mfu.py trains from shards)"
else
    step vit-mfu 30 --jsonl "$RES/vit_mfu_cuda.jsonl" "$PY" benchmarks/vit_mfu.py --device $DEV "${QUICK[@]}"
fi
# Each search under its own budget (the script's --budget-s; the step's limit adds start-up and the summary).
step capacity-tokens 20 --jsonl "$RES/gpu_capacity_cuda.jsonl" "$PY" benchmarks/gpu_capacity.py --device $DEV \
    --skip largest --budget-s "$(awk -v k="$SCALE" 'BEGIN { printf "%d", 14 * k }')" "${QUICK[@]}"
step capacity-largest 45 --jsonl "$RES/gpu_capacity_cuda.jsonl" "$PY" benchmarks/gpu_capacity.py --device $DEV \
    --skip tokens --budget-s "$(awk -v k="$SCALE" 'BEGIN { printf "%d", 38 * k }')" "${QUICK[@]}"
step goals 5 --jsonl "$RES/goals_cuda.jsonl" "$PY" benchmarks/gpu_goals.py "$RES"

echo "gpu-check: results in $RES/*_cuda.jsonl, steps in $STATUS"
exit $failed
