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
set -uo pipefail
PY=${1:-python3}
WHEELS=${2:-wheelhouse}
SCALE=${GPU_CHECK_SCALE:-1}
cd "$(dirname "$0")/.."
RES=benchmarks/results
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} DS_ACCELERATOR=cuda
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS=$RES/gpu_check_cuda.jsonl
: > "$STATUS"
failed=0

step() {  # step NAME SECONDS CMD...: run CMD under a limit, record rc and time
    local name=$1 limit=$2
    shift 2
    limit=$(awk -v s="$limit" -v k="$SCALE" 'BEGIN { printf "%d", s * k }')
    echo "== gpu-check: $name (limit ${limit}s)"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@"
    rc=$?
    [[ $rc -ne 0 ]] && failed=1
    local note=""
    [[ $rc -eq 124 || $rc -eq 137 ]] && note=", \"note\": \"stopped at its ${limit}s limit\""
    printf '{"step": "%s", "rc": %d, "seconds": %d, "limit_s": %d%s}\n' "$name" "$rc" $((SECONDS - t0)) "$limit" "$note" >> "$STATUS"
    echo "== gpu-check: $name rc=$rc in $((SECONDS - t0))s"
    return 0
}

jsonl() {  # jsonl FILE CMD...: keep the JSON lines CMD prints (and show everything)
    local out=$1
    shift
    "$@" | tee /dev/stderr | grep '^{' >> "$out"
    return "${PIPESTATUS[0]}"
}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: $PY sees no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine with a CUDA torch" >&2
    exit 2
fi
if [[ ! -d "$WHEELS" ]]; then
    echo "gpu-check: no wheelhouse at '$WHEELS'; run 'make wheelhouse' on a machine with a package registry and copy the folder here (or pass WHEELHOUSE=path)" >&2
    exit 2
fi
"$PY" -c 'import torch; print("gpu-check:", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'

# -- 1. install, offline -------------------------------------------------------------------------
step install 40 bash -c "
    '$PY' -m pip install -q --disable-pip-version-check --no-index --find-links '$WHEELS' deepspeed webdataset pydantic &&
    '$PY' -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation -e ."

# DeepSpeed's CPU Adam (stock offload and interleaved offload use it) is JIT-built on first use:
# build it once here, so the tests and the offload benchmark find it in the torch extensions cache.
step build-cpu-adam 60 "$PY" -c 'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()'

# -- 2. the CUDA tests ----------------------------------------------------------------------------
rm -f "$RES"/gpu_tests_cuda.*
step pytest-gpu 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rs --durations=15 \
    --junitxml="$RES/gpu_tests_cuda.xml" --timeout=150

# -- 3. benchmarks, each with its peer in the same run --------------------------------------------
for f in decode_attention offload vit_mfu gpu_capacity goals; do rm -f "$RES/${f}_cuda.jsonl"; done
step decode-b1 25 "$PY" benchmarks/decode_attention.py --device cuda --batch 1 --repeats 10 --out "$RES/decode_attention_cuda.jsonl"
step decode-b8 25 "$PY" benchmarks/decode_attention.py --device cuda --batch 8 --repeats 10 --out "$RES/decode_attention_cuda.jsonl"
step offload 50 jsonl "$RES/offload_cuda.jsonl" "$PY" benchmarks/offload.py --device cuda --model vit_large_patch16_224 \
    --batch 32 --precision bf16 --sub-group-size 20000000 --steps 4 --warmup 2
step vit-mfu 35 jsonl "$RES/vit_mfu_cuda.jsonl" "$PY" benchmarks/vit_mfu.py --device cuda
step capacity 25 jsonl "$RES/gpu_capacity_cuda.jsonl" "$PY" benchmarks/gpu_capacity.py --device cuda --budget-s 20
step goals 5 jsonl "$RES/goals_cuda.jsonl" "$PY" benchmarks/gpu_goals.py "$RES"

echo "gpu-check: results in $RES/*_cuda.jsonl, steps in $STATUS"
exit $failed
