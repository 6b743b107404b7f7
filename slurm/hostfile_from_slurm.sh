#!/usr/bin/env bash
# Write a DeepSpeed hostfile ("host slots=N" per line) for the current Slurm allocation.
#
#   slurm/hostfile_from_slurm.sh [SLOTS_PER_NODE] > hostfile
#   deepspeed --hostfile hostfile --master_addr "$(head -n1 hostfile | cut -d' ' -f1)" launch/train.py ...
#
# Slots per node, first found: the argument; SLURM_GPUS_ON_NODE (the GPUs given on each node);
# SLURM_TASKS_PER_NODE (tasks per node, e.g. "8(x2),4", expanded node by node).
set -euo pipefail

if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
    echo "hostfile_from_slurm: SLURM_JOB_NODELIST is not set; run this inside a Slurm allocation (sbatch, salloc)" >&2
    exit 2
fi
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")

slots=()
if [ $# -ge 1 ]; then
    [[ "$1" =~ ^[1-9][0-9]*$ ]] || { echo "hostfile_from_slurm: SLOTS_PER_NODE must be a positive integer, got '$1'" >&2; exit 2; }
    for _ in "${hosts[@]}"; do slots+=("$1"); done
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ]; then
    for _ in "${hosts[@]}"; do slots+=("$SLURM_GPUS_ON_NODE"); done
elif [ -n "${SLURM_TASKS_PER_NODE:-}" ]; then
    # "8(x2),4" -> 8 8 4: one count per node, in node-list order.
    IFS=',' read -ra groups <<< "$SLURM_TASKS_PER_NODE"
    for g in "${groups[@]}"; do
        if [[ "$g" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            for _ in $(seq "${BASH_REMATCH[2]}"); do slots+=("${BASH_REMATCH[1]}"); done
        else
            slots+=("$g")
        fi
    done
else
    echo "hostfile_from_slurm: no slot count: pass SLOTS_PER_NODE, or allocate with --gpus-per-node or --ntasks-per-node" >&2
    exit 2
fi

if [ "${#slots[@]}" -ne "${#hosts[@]}" ]; then
    echo "hostfile_from_slurm: ${#hosts[@]} node(s) in '$SLURM_JOB_NODELIST' but ${#slots[@]} slot count(s) from '${SLURM_TASKS_PER_NODE:-}'" >&2
    exit 2
fi
for i in "${!hosts[@]}"; do
    echo "${hosts[$i]} slots=${slots[$i]}"
done
