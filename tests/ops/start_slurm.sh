#!/usr/bin/env bash
# Start a one-host Slurm cluster (munged, slurmctld, slurmd) on loopback for the tests.
#
#   eval "$(bash tests/ops/start_slurm.sh)"     # prints `export SLURM_CONF=...` on its last line
#   bash tests/ops/stop_slurm.sh                # stops it again
#
# The configuration lives in its own folder (DISTVIT_SLURM_DIR, default /tmp/distvit-slurm) and is
# passed to every Slurm command through SLURM_CONF, so an existing /etc/slurm is never touched.
# Idempotent: when the controller already answers with this configuration, nothing is restarted.
# Known to work with Debian's slurm-wlm 22.05 as root: proctrack/linuxproc and task/none need no
# cgroups, select/cons_tres hands out the host's CPUs one per task.
set -euo pipefail

STATE=${DISTVIT_SLURM_DIR:-/tmp/distvit-slurm}
CONF=$STATE/slurm.conf
NODE=$(hostname -s)
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS; the node has them all
PARTITION=distvit

log() { echo "start_slurm: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (slurmd runs jobs as any user only as root); run as root or skip the Slurm tests"
for cmd in munged slurmctld slurmd scontrol sinfo; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || die "$cmd not found; run tests/ops/install_ops_deps.sh first"
done
export PATH=$PATH:/usr/sbin

# --- munge: the controller and the node authenticate each other with it
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    mkdir -p /run/munge
    chown munge:munge /run/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || create-munge-key -f; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    munged --force
    for _ in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
    (munge -n | unmunge) >/dev/null 2>&1 || die "munged started but does not answer; see /var/log/munge/munged.log"
fi

# --- configuration: written every time (cheap), daemons restarted only when it changed or they are down
mkdir -p "$STATE/ctld" "$STATE/spool"
NEW_CONF=$(cat <<CONF
# Written by tests/ops/start_slurm.sh: a one-host test cluster on loopback.
ClusterName=distvit
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every second, so a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
# A requeued job waits cred_expire seconds (default 120) before it may start again; 5 keeps tests short.
AuthInfo=cred_expire=5
ReturnToService=2
# Finished jobs stay visible to scontrol for 10 minutes (the tests read their exit codes).
MinJobAge=600
KillWait=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
)
changed=1
[ -f "$CONF" ] && [ "$(cat "$CONF")" = "$NEW_CONF" ] && changed=0
export SLURM_CONF=$CONF

daemon_up() {  # pid file names a live process
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}
stop_daemon() {
    if daemon_up "$1"; then
        local pid; pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
}

if [ $changed -eq 1 ]; then
    stop_daemon "$STATE/slurmd.pid"
    stop_daemon "$STATE/slurmctld.pid"
    printf '%s\n' "$NEW_CONF" > "$CONF"
fi
if ! daemon_up "$STATE/slurmctld.pid"; then
    # -c: a clean start (no jobs from an earlier cluster on this folder); -i: ignore stale state files.
    slurmctld -f "$CONF" -c -i
fi
if ! daemon_up "$STATE/slurmd.pid"; then
    slurmd -f "$CONF"
fi

# --- wait until the node is idle (or already running our jobs) in our partition
wait_node() {  # $1: seconds
    for _ in $(seq $(($1 * 5))); do
        state=$(sinfo -h -p "$PARTITION" -n "$NODE" -o %t 2>/dev/null || true)
        case "$state" in
            idle|mix|alloc|comp) return 0 ;;
            down*|drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    return 1
}
if ! wait_node 30; then
    # Not registered (a CI run once saw 'unk*' here, cause unknown): say what the logs say, restart
    # both daemons from a clean state once, and wait again before giving up.
    log "node $NODE is '$state' after 30 s; restarting slurmctld and slurmd once"
    for f in slurmd.log slurmctld.log; do log "--- last lines of $STATE/$f:"; tail -n 15 "$STATE/$f" >&2 2>/dev/null || true; done
    stop_daemon "$STATE/slurmd.pid"
    stop_daemon "$STATE/slurmctld.pid"
    pkill -f "slurmd -f $CONF" 2>/dev/null || true  # ours, even when its pid file is gone
    slurmctld -f "$CONF" -c -i
    slurmd -f "$CONF"
    if ! wait_node 60; then
        for f in slurmd.log slurmctld.log; do log "--- last lines of $STATE/$f:"; tail -n 25 "$STATE/$f" >&2 2>/dev/null || true; done
        die "node $NODE is '$state' after a restart and 60 s more; see $STATE/slurmctld.log and $STATE/slurmd.log"
    fi
fi
log "cluster up: node $NODE ($CPUS CPUs) in partition $PARTITION, config $CONF"
echo "export SLURM_CONF=$CONF"
