#!/usr/bin/env bash
# Run a command "on" a node of the two-node test cluster (start_cluster2.sh):
#   bash tests/ops/on_node.sh dvtest-n1 sbatch ...
# It enters the node's network namespace, and private mount and UTS namespaces in which the node
# has its own hostname and its own /etc/hosts (/etc/netns/<node>/hosts bound over it). Unlike
# `ip netns exec`, it keeps the host's /sys (with its cgroup mounts, which slurmd 22.05 needs).
set -euo pipefail
node=${1:?usage: on_node.sh NODE COMMAND [ARG ...]}
shift
[ -e "/run/netns/$node" ] || { echo "on_node: no network namespace $node; start it with tests/ops/start_cluster2.sh" >&2; exit 1; }
exec nsenter --net="/run/netns/$node" unshare --mount --uts --propagation private \
    bash -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$0" && exec "$@"' "$node" "$@"
