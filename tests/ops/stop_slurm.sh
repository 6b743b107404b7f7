#!/usr/bin/env bash
# Stop the one-host test cluster that start_slurm.sh started (its slurmd and slurmctld, by pid file).
# munged is left running: other programs on the host may use it.
set -euo pipefail
STATE=${DISTVIT_SLURM_DIR:-/tmp/distvit-slurm}
for daemon in slurmd slurmctld; do
    pidfile=$STATE/$daemon.pid
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        echo "stop_slurm: stopped $daemon ($pid)"
    fi
done
