#!/usr/bin/env bash
# Start a two-node Slurm test cluster on this one machine: two network namespaces are the nodes.
#
#   eval "$(bash tests/ops/start_cluster2.sh)"   # last line: export SLURM_CONF=...
#   bash tests/ops/on_node.sh dvtest-n1 sbatch --nodes 2 --ntasks-per-node 2 slurm/train.sbatch demo_digits
#   bash tests/ops/stop_cluster2.sh              # stops the daemons, deletes the namespaces
#
# Layout (all of it private to this machine; no other address is ever used):
#   dvtest-n1  10.218.18.1/24 on veth `dvnet0`  slurmctld + slurmd -N dvtest-n1
#   dvtest-n2  10.218.18.2/24 on veth `dvnet0`  slurmd -N dvtest-n2
# The veth pair joins the two namespaces directly; the root namespace is not on it, so Slurm
# commands run inside a node (tests/ops/on_node.sh dvtest-n1 ...), as on a cluster's login node.
# Each node has its own hostname and resolves names through /etc/netns/<ns>/hosts, bound over
# /etc/hosts for its processes only (tests/ops/on_node.sh; the host's /etc/hosts is not touched). munged is the host's (a unix socket;
# the namespaces share the file system, as a real cluster shares its key and its file system).
# The configuration and state live in DISTVIT_SLURM2_DIR (default /tmp/distvit-slurm2), apart from
# the one-host cluster of start_slurm.sh, which keeps working beside this one (its daemons listen in
# the root namespace; these in their own). Idempotent: a running cluster with the same config is kept.
set -euo pipefail

STATE=${DISTVIT_SLURM2_DIR:-/tmp/distvit-slurm2}
CONF=$STATE/slurm.conf
N1=dvtest-n1
N2=dvtest-n2
NET=10.218.18
IFACE=dvnet0
PARTITION=distvit2
OPS=$(cd "$(dirname "$0")" && pwd)

log() { echo "start_cluster2: $*" >&2; }
die() { log "$*"; exit 1; }
unsupported() { log "$*"; exit 3; }  # the tests skip with this line

[ "$(id -u)" -eq 0 ] || unsupported "needs root (network namespaces, and slurmd runs jobs as any user only as root)"
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || unsupported "ip (iproute2) not found; apt-get install iproute2"
for cmd in munged slurmctld slurmd scontrol sinfo; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || die "$cmd not found; run tests/ops/install_ops_deps.sh first"
done
export PATH=$PATH:/usr/sbin
in_ns() { ip netns exec "$@"; }                  # network only (set-up below)
on_node() { bash "$OPS/on_node.sh" "$@"; }         # the node's network, hostname and /etc/hosts

# --- the two nodes: namespaces, a veth pair between them, loopback, names
ns_ready() { in_ns "$1" ip -4 addr show dev "$IFACE" 2>/dev/null | grep -q "inet $2/"; }
if ! ns_ready "$N1" "$NET.1" || ! ns_ready "$N2" "$NET.2"; then
    bash "$OPS/stop_cluster2.sh" >/dev/null 2>&1 || true  # half-made leftovers of an earlier run
    ip netns add "$N1" 2>/dev/null || unsupported "cannot create network namespace $N1 (ip netns add): this machine does not allow network namespaces"
    ip netns add "$N2" || die "cannot create network namespace $N2"
    ip link add "$IFACE" netns "$N1" type veth peer name "$IFACE" netns "$N2" \
        || unsupported "cannot create a veth pair between $N1 and $N2 (ip link add ... type veth)"
    in_ns "$N1" ip addr add "$NET.1/24" dev "$IFACE"
    in_ns "$N2" ip addr add "$NET.2/24" dev "$IFACE"
    for ns in "$N1" "$N2"; do
        in_ns "$ns" ip link set lo up
        in_ns "$ns" ip link set "$IFACE" up
    done
fi
for ns in "$N1" "$N2"; do
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s.1 %s\n%s.2 %s\n' "$NET" "$N1" "$NET" "$N2" > "/etc/netns/$ns/hosts"
done

# --- munge: the controller and the nodes authenticate each other with it
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    mkdir -p /run/munge
    chown munge:munge /run/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || create-munge-key -f; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    munged --force
    for _ in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
    (munge -n | unmunge) >/dev/null 2>&1 || die "munged started but does not answer; see /var/log/munge/munged.log"
fi

# --- configuration: both nodes get 2 CPUs at least (the tests run 2 tasks per node), whatever the
# machine has; config_overrides makes slurmd take the configured counts instead of the hardware's.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
[ "$CPUS" -ge 2 ] || CPUS=2
mkdir -p "$STATE/ctld"
NEW_CONF=$(cat <<CONF
# Written by tests/ops/start_cluster2.sh: a two-node test cluster in network namespaces $N1, $N2.
ClusterName=distvit2
SlurmctldHost=$N1($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
AuthInfo=cred_expire=5
ReturnToService=2
MinJobAge=600
# A node that stops answering is DOWN after 6 s (its jobs fail over: requeued); a killed job's
# processes get 5 s between SIGTERM and SIGKILL.
SlurmdTimeout=6
KillWait=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$N1 NodeAddr=$NET.1 NodeHostname=$N1 CPUs=$CPUS State=UNKNOWN
NodeName=$N2 NodeAddr=$NET.2 NodeHostname=$N2 CPUs=$CPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$N1,$N2 Default=YES MaxTime=INFINITE State=UP
CONF
)
changed=1
[ -f "$CONF" ] && [ "$(cat "$CONF")" = "$NEW_CONF" ] && changed=0
export SLURM_CONF=$CONF

daemon_up() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_daemon() {
    if daemon_up "$1"; then
        local pid; pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
}
if [ $changed -eq 1 ]; then
    for n in "$N1" "$N2"; do stop_daemon "$STATE/slurmd-$n.pid"; done
    stop_daemon "$STATE/slurmctld.pid"
    printf '%s\n' "$NEW_CONF" > "$CONF"
fi
if ! daemon_up "$STATE/slurmctld.pid"; then
    on_node "$N1" slurmctld -f "$CONF" -c -i
fi
for n in "$N1" "$N2"; do
    daemon_up "$STATE/slurmd-$n.pid" || { mkdir -p "$STATE/spool-$n"; on_node "$n" slurmd -f "$CONF" -N "$n"; }
done

# --- wait until both nodes are up in the partition
for _ in $(seq 150); do
    states=$(on_node "$N1" sinfo -h -p "$PARTITION" -N -o '%N=%t' 2>/dev/null | sort | tr '\n' ' ' || true)
    ok=0
    for n in "$N1" "$N2"; do
        case "$states" in *"$n=idle"*|*"$n=mix"*|*"$n=alloc"*|*"$n=comp"*) ok=$((ok + 1)) ;; esac
        case "$states" in *"$n=down"*|*"$n=drain"*) on_node "$N1" scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;; esac
    done
    [ $ok -eq 2 ] && break
    sleep 0.2
done
[ "${ok:-0}" -eq 2 ] || die "nodes are '$states' after 30 s; see $STATE/slurmctld.log and $STATE/slurmd-*.log"
log "cluster up: $N1 ($NET.1), $N2 ($NET.2), $CPUS CPUs each, partition $PARTITION, config $CONF"
echo "export SLURM_CONF=$CONF"
