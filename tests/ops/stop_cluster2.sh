#!/usr/bin/env bash
# Tear down the two-node test cluster of start_cluster2.sh: its daemons (by pid file), every process
# left inside its two namespaces (they only hold what the tests started there), the namespaces (and
# with them the veth pair), and their /etc/netns/<ns> name files. Safe to run when nothing is up.
set -uo pipefail
STATE=${DISTVIT_SLURM2_DIR:-/tmp/distvit-slurm2}
NODES=(dvtest-n1 dvtest-n2)

for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stop_cluster2: stopped $(basename "$pidfile" .pid) ($pid)"
    fi
done
for ns in "${NODES[@]}"; do
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -9 $pids 2>/dev/null || true
            echo "stop_cluster2: killed what was left in $ns: $(echo $pids)"
        fi
        ip netns del "$ns" && echo "stop_cluster2: deleted namespace $ns"
    fi
    rm -rf "/etc/netns/$ns"
done
exit 0
