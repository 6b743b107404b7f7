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
# usage: benchmarks/gpu_check.sh [PYTHON] [WHEELHOUSE]
# GPU_CHECK_DRY_RUN=1: the same steps on the CPU with tiny sizes, no install, results into a
# temporary folder (checks this script on a machine without a GPU; numbers mean nothing).
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
        timeout -k 10 "$limit" "$@" | tee /dev/stderr | grep '^{' >> "$out"
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
"$PY" -c 'import torch; print("gpu-check:", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)")'

# -- 1. install, offline -------------------------------------------------------------------------
if [[ $DRY != 1 ]]; then
    step install 25 bash -c "
        '$PY' -m pip install -q --disable-pip-version-check --no-index --find-links '$WHEELS' deepspeed webdataset pydantic &&
        '$PY' -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation -e ."
fi

# DeepSpeed's CPU Adam (stock offload and interleaved offload use it) is JIT-built on first use:
# build it once here, so the tests and the offload benchmark find it in the torch extensions cache.
step build-cpu-adam 45 "$PY" -c 'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()'

# -- 2. the CUDA tests ----------------------------------------------------------------------------
rm -f "$RES"/gpu_tests_cuda.*
step pytest-gpu 260 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rs --durations=15 \
    --junitxml="$RES/gpu_tests_cuda.xml" --timeout=200

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
step vit-mfu 30 --jsonl "$RES/vit_mfu_cuda.jsonl" "$PY" benchmarks/vit_mfu.py --device $DEV "${QUICK[@]}"
step capacity 20 --jsonl "$RES/gpu_capacity_cuda.jsonl" "$PY" benchmarks/gpu_capacity.py --device $DEV --budget-s 15 "${QUICK[@]}"
step goals 5 --jsonl "$RES/goals_cuda.jsonl" "$PY" benchmarks/gpu_goals.py "$RES"

echo "gpu-check: results in $RES/*_cuda.jsonl, steps in $STATUS"
exit $failed
