#!/usr/bin/env bash
# Install what the Slurm and MPI tests run against, from Debian's packages:
#   slurmctld + slurmd + slurm-client (22.05), munge, openmpi-bin (4.1.4), and for DeepSpeed's pdsh
#   launcher across the two-node cluster pdsh, the ssh client and libwrap0 (sshd's one library not
#   already here; sshd itself is unpacked, not installed, by start_sshd2.sh).
# Idempotent: does nothing when every command is already there. Needs root (or passwordless sudo)
# and apt-get; where either is missing it says so and exits 1, and the tests skip with that reason.
set -euo pipefail

need=(sbatch srun scontrol squeue slurmctld slurmd munged mpirun pdsh ssh)
missing=()
for cmd in "${need[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_ops_deps: slurm, munge, openmpi and pdsh already installed"
    exit 0
fi
echo "install_ops_deps: missing ${missing[*]}; installing from apt"

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "install_ops_deps: not root and no passwordless sudo; cannot install ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_ops_deps: no apt-get on this machine; install slurm-wlm, munge and openmpi-bin by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
# --no-install-recommends keeps the daemons' optional plugins (and their X/GPU deps) out.
"${SUDO[@]}" apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge openmpi-bin pdsh openssh-client libwrap0
echo "install_ops_deps: done"
