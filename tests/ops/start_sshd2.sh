#!/usr/bin/env bash
# sshd on each node of the two-node test cluster (start_cluster2.sh first), for DeepSpeed's pdsh
# launcher. Each sshd listens on its node's veth address only, and lets in root with a key of its own
# (in $STATE/ssh; ~/.ssh and /etc/ssh are not touched). Prints the ssh client config to use:
#   PDSH_SSH_ARGS_APPEND="-F $(bash tests/ops/start_sshd2.sh)" pdsh -R ssh -w dvtest-n1,dvtest-n2 hostname
# The sshd binary: the machine's, else one unpacked from Debian's openssh-server package without
# installing it (installing it would start an sshd on every address of the machine).
set -euo pipefail
STATE=${DISTVIT_SLURM2_DIR:-/tmp/distvit-slurm2}
SSH=$STATE/ssh
OPS=$(cd "$(dirname "$0")" && pwd)
NODES=(dvtest-n1 dvtest-n2)
NET=10.218.18
log() { echo "start_sshd2: $*" >&2; }
die() { log "$*"; exit 1; }

SSHD=$(command -v sshd || true)
[ -n "$SSHD" ] || [ ! -x /usr/sbin/sshd ] || SSHD=/usr/sbin/sshd
if [ -z "$SSHD" ]; then
    UNPACKED=/tmp/distvit-sshd
    if [ ! -x "$UNPACKED/usr/sbin/sshd" ]; then
        tmp=$(mktemp -d)
        (cd "$tmp" && apt-get download -q openssh-server >/dev/null 2>&1) || die "cannot download openssh-server (apt-get download)"
        dpkg-deb -x "$tmp"/openssh-server_*.deb "$UNPACKED"
        rm -rf "$tmp"
    fi
    SSHD=$UNPACKED/usr/sbin/sshd
fi
missing=$(ldd "$SSHD" | awk '/not found/ {print $1}' | tr '\n' ' ')
[ -z "$missing" ] || die "$SSHD needs $missing; run tests/ops/install_ops_deps.sh (it installs libwrap0)"
command -v pdsh >/dev/null 2>&1 || die "pdsh not found; run tests/ops/install_ops_deps.sh"
mkdir -p "$SSH" /run/sshd
# sshd's privilege separation user, as the openssh-server package would create it
id sshd >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /run/sshd --shell /usr/sbin/nologin sshd
[ -f "$SSH/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSH/host_ed25519"
[ -f "$SSH/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSH/id_ed25519"
cp "$SSH/id_ed25519.pub" "$SSH/authorized_keys"
cat > "$SSH/ssh_config" <<CONF
Host dvtest-n1 dvtest-n2
    IdentityFile $SSH/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
CONF
i=0
for node in "${NODES[@]}"; do
    i=$((i + 1))
    pidfile=$SSH/sshd-$node.pid
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then continue; fi
    cat > "$SSH/sshd-$node.conf" <<CONF
ListenAddress $NET.$i
HostKey $SSH/host_ed25519
PidFile $pidfile
AuthorizedKeysFile $SSH/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
CONF
    bash "$OPS/on_node.sh" "$node" "$SSHD" -f "$SSH/sshd-$node.conf" || die "sshd did not start on $node"
done
for node in "${NODES[@]}"; do
    ok=0
    for _ in $(seq 50); do
        bash "$OPS/on_node.sh" "${NODES[0]}" ssh -F "$SSH/ssh_config" "$node" true 2>/dev/null && { ok=1; break; }
        sleep 0.2
    done
    [ $ok = 1 ] || die "cannot ssh from ${NODES[0]} to $node; see $SSH/sshd-$node.conf"
done
log "sshd up on ${NODES[*]}"
echo "$SSH/ssh_config"
