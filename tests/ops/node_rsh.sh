#!/usr/bin/env bash
# The "ssh" of the two-node test cluster, for Open MPI's rsh launcher (`--mca plm_rsh_agent`):
# Open MPI calls it as `node_rsh.sh HOST COMMAND...` to start its daemon (orted) on HOST; it runs
# the command in a shell on that node (tests/ops/on_node.sh). Like ssh it joins the words into one
# shell command; unlike ssh it keeps the caller's environment (the nodes share one file system and
# one venv, so PATH and PYTHONPATH are right on both).
set -euo pipefail
host=${1:?usage: node_rsh.sh HOST COMMAND...}
shift
exec bash "$(dirname "$0")/on_node.sh" "$host" bash -c "$*"
