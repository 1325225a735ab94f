#!/usr/bin/env bash
# Bring up (or down) the services the tests and the demo need:
#   * a Docker daemon (dockerd), started in the background when `docker info` fails;
#   * a loopback registry (CNCF distribution, Debian's docker-registry) on 127.0.0.1:PORT;
#   * a single-node Slurm on this host (Debian's slurm-wlm and munge: munged, slurmctld and
#     slurmd, no systemd), for the array-job tests. Slurm is optional: when it cannot be
#     installed or started, `up` says so and still brings Docker and the registry up;
# and the Debian packages they and the benchmark use (socat, pv, skopeo, umoci, rsync, zstd).
#
# Usage: scripts/services.sh up|down|status
#
# Environment:
#   ASYNCCACHE_REGISTRY_PORT  registry port (default 5000)
#   ASYNCCACHE_STATE_DIR      logs, pid files, registry config and storage, Slurm state
#                             (default /var/tmp/asynccache-services)
#   ASYNCCACHE_DOCKERD_ARGS   extra dockerd flags, e.g. --storage-driver=vfs
#   ASYNCCACHE_SLURM          0 leaves Slurm alone (default 1)
set -euo pipefail

PORT="${ASYNCCACHE_REGISTRY_PORT:-5000}"
STATE="${ASYNCCACHE_STATE_DIR:-/var/tmp/asynccache-services}"
REGISTRY_ADDR="127.0.0.1:${PORT}"
REGISTRY_CONFIG="${STATE}/registry.yml"
REGISTRY_PID="${STATE}/registry.pid"
REGISTRY_LOG="${STATE}/registry.log"
DOCKERD_LOG="${STATE}/dockerd.log"
DOCKERD_WAIT="${ASYNCCACHE_DOCKERD_WAIT:-60}"
REGISTRY_WAIT="${ASYNCCACHE_REGISTRY_WAIT:-30}"

APT_UPDATED=0

say() { printf '%s\n' "$*"; }
die() { printf 'services.sh: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

have() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
    # apt_install PACKAGE...: install packages with apt-get (root only).
    if ! is_root; then
        return 1
    fi
    if ! have apt-get; then
        return 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "packages: apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
    say "packages: apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

elf_is_static() {
    # elf_is_static FILE: exits 10 for an ELF without a program interpreter (static),
    # 11 for any other file; anything else means python3 could not tell.
    python3 - "$1" <<'PY' 2>/dev/null
import struct
import sys

with open(sys.argv[1], "rb") as handle:
    header = handle.read(64)
    if header[:4] != b"\x7fELF" or header[4] != 2:
        sys.exit(11)
    (phoff,) = struct.unpack_from("<Q", header, 32)
    phentsize, phnum = struct.unpack_from("<HH", header, 54)
    handle.seek(phoff)
    table = handle.read(phentsize * phnum)
types = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)]
sys.exit(11 if 3 in types else 10)
PY
}

static_busybox() {
    # Succeeds when a statically linked busybox is available.
    local bb rc
    for bb in /bin/busybox /usr/bin/busybox; do
        [ -x "$bb" ] || continue
        rc=0
        elf_is_static "$bb" || rc=$?
        case "$rc" in
            10) return 0 ;;
            11) continue ;;
        esac
        if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
            return 0
        fi
    done
    return 1
}

ensure_packages() {
    local missing=()
    if ! have docker || ! have dockerd; then
        missing+=(docker.io)
    fi
    have docker-registry || missing+=(docker-registry)
    static_busybox || missing+=(busybox-static)
    have git || missing+=(git)
    have socat || missing+=(socat)
    have pv || missing+=(pv)
    # the benchmark's peers and transfers: skopeo copy + umoci raw unpack, rsync -a
    have skopeo || missing+=(skopeo)
    have umoci || missing+=(umoci)
    have rsync || missing+=(rsync)
    have zstd || missing+=(zstd)  # reads an export stream in the tests, as a user would
    have openssl || missing+=(openssl)
    if [ "${#missing[@]}" -eq 0 ]; then
        say "packages: all present"
        return 0
    fi
    if ! apt_install "${missing[@]}"; then
        local essential=()
        have docker || essential+=(docker.io)
        have docker-registry || essential+=(docker-registry)
        static_busybox || essential+=(busybox-static)
        have git || essential+=(git)
        have openssl || essential+=(openssl)
        if [ "${#essential[@]}" -gt 0 ]; then
            die "missing ${essential[*]} and cannot install them (need root and apt-get)"
        fi
        say "packages: optional ${missing[*]} missing (not root: not installed)"
        return 0
    fi
    have docker || die "docker CLI still missing after installing docker.io"
    have dockerd || die "dockerd still missing after installing docker.io"
    have docker-registry || die "docker-registry still missing after installing it"
    static_busybox || die "static busybox still missing after installing busybox-static"
}

docker_up() { docker info >/dev/null 2>&1; }

process_alive() {
    # process_alive PID NAME: PID is a live (not zombie) process called NAME.
    [ -n "$1" ] && [ "$(cat "/proc/${1}/comm" 2>/dev/null)" = "$2" ] \
        && ! grep -q '^State:[[:space:]]*Z' "/proc/${1}/status" 2>/dev/null
}

stop_orphaned_containerd() {
    # The containerd a killed dockerd started outlives it for a while and holds its socket: a
    # new dockerd then times out starting its own. Stop it (TERM, then KILL after 10 s).
    local file=/var/run/docker/containerd/containerd.pid pid waited=0
    [ -f "$file" ] || return 0
    pid="$(tr -dc '0-9' <"$file")"
    if process_alive "$pid" containerd; then
        say "containerd: stopping the one a dead dockerd left (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        while process_alive "$pid" containerd && [ "$waited" -lt 10 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        if process_alive "$pid" containerd; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$file"
}

remove_stale_pidfile() {
    # remove_stale_pidfile FILE NAME: a daemon killed without its clean-up leaves its pid file,
    # and dockerd refuses to start while one exists. Remove it when no live process NAME has
    # that pid (a killed daemon nobody reaped stays a zombie under its old name).
    local file="$1" name="$2" pid
    [ -f "$file" ] || return 0
    pid="$(tr -dc '0-9' <"$file")"
    if process_alive "$pid" "$name"; then
        return 0
    fi
    say "${name}: removing the stale pid file $file (pid ${pid:-none} is not $name)"
    rm -f "$file"
}

ensure_dockerd() {
    if docker_up; then
        say "dockerd: already running"
        return 0
    fi
    have dockerd || die "dockerd not found and docker info fails"
    if ! is_root; then
        die "docker info fails and dockerd can only be started as root (or fix DOCKER_HOST)"
    fi
    mkdir -p "$STATE"
    remove_stale_pidfile /var/run/docker.pid dockerd
    stop_orphaned_containerd
    nohup dockerd ${ASYNCCACHE_DOCKERD_ARGS:-} </dev/null >"$DOCKERD_LOG" 2>&1 &
    local pid=$!
    echo "$pid" >"${STATE}/dockerd.pid"
    local waited=0
    while ! docker_up; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            die "dockerd exited during start-up (log: $DOCKERD_LOG)"
        fi
        if [ "$waited" -ge "$DOCKERD_WAIT" ]; then
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            die "dockerd did not answer within ${DOCKERD_WAIT}s (log: $DOCKERD_LOG)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "dockerd: started (pid $pid, log $DOCKERD_LOG, ready after ${waited}s)"
}

registry_up() {
    local url="http://${REGISTRY_ADDR}/v2/"
    if have curl; then
        curl -fsS -m 3 -o /dev/null "$url" 2>/dev/null
    elif have python3; then
        python3 - "$url" <<'PY' 2>/dev/null
import sys
import urllib.request

with urllib.request.urlopen(sys.argv[1], timeout=3) as response:
    sys.exit(0 if response.status == 200 else 1)
PY
    else
        (
            exec 3<>"/dev/tcp/127.0.0.1/${PORT}" || exit 1
            printf 'GET /v2/ HTTP/1.0\r\nHost: %s\r\n\r\n' "$REGISTRY_ADDR" >&3
            head -n 1 <&3 | grep -q ' 200 '
        ) 2>/dev/null
    fi
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/${PORT}") 2>/dev/null
}

write_registry_config() {
    mkdir -p "${STATE}/registry"
    cat >"$REGISTRY_CONFIG" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: ${STATE}/registry
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: ${REGISTRY_ADDR}
  secret: asynccache-loopback-registry
EOF
}

ensure_registry() {
    if registry_up; then
        say "registry: already running on ${REGISTRY_ADDR}"
        return 0
    fi
    have docker-registry || die "docker-registry not found and no registry answers on ${REGISTRY_ADDR}"
    if port_in_use; then
        die "port ${PORT} is taken by something that is not a registry (set ASYNCCACHE_REGISTRY_PORT)"
    fi
    mkdir -p "$STATE"
    write_registry_config
    nohup docker-registry serve "$REGISTRY_CONFIG" </dev/null >"$REGISTRY_LOG" 2>&1 &
    local pid=$!
    echo "$pid" >"$REGISTRY_PID"
    local waited=0
    while ! registry_up; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$REGISTRY_PID"
            tail -n 20 "$REGISTRY_LOG" >&2 || true
            die "docker-registry exited during start-up (log: $REGISTRY_LOG)"
        fi
        if [ "$waited" -ge "$((REGISTRY_WAIT * 5))" ]; then
            tail -n 20 "$REGISTRY_LOG" >&2 || true
            die "registry did not answer on ${REGISTRY_ADDR} within ${REGISTRY_WAIT}s (log: $REGISTRY_LOG)"
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
    say "registry: started on ${REGISTRY_ADDR} (pid $pid, storage ${STATE}/registry, log $REGISTRY_LOG)"
}

our_registry_pid() {
    # Prints the pid from the pid file when it is a live docker-registry process.
    [ -f "$REGISTRY_PID" ] || return 1
    local pid
    pid="$(cat "$REGISTRY_PID")"
    [ -n "$pid" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [ -r "/proc/${pid}/cmdline" ]; then
        tr '\0' ' ' <"/proc/${pid}/cmdline" | grep -q 'docker-registry' || return 1
    fi
    printf '%s\n' "$pid"
}

# --- Slurm: one node on this host ---------------------------------------------------------------

SLURM_STATE="${STATE}/slurm"
SLURM_CONF_FILE="${SLURM_CONF:-/etc/slurm/slurm.conf}"
SLURM_MARKER="# Written by asynccache scripts/services.sh for a single-node test cluster."
SLURM_WAIT="${ASYNCCACHE_SLURM_WAIT:-30}"

slurm_wanted() { [ "${ASYNCCACHE_SLURM:-1}" != "0" ]; }

munge_up() { have munge && have unmunge && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

slurm_node_state() {
    # Prints this host's node state as sinfo reports it (e.g. idle, mixed, down*).
    have sinfo || return 1
    timeout 15 sinfo -h -N -o '%T' -n "$(hostname -s)" 2>/dev/null | head -n 1
}

slurm_up() {
    # The controller reports this node usable and this host's slurmd answers (the controller
    # notices a dead slurmd only minutes later).
    local state
    have scontrol && scontrol show slurmd >/dev/null 2>&1 || return 1
    state="$(slurm_node_state)" || return 1
    case "$state" in
        idle | mixed | allocated | completing) return 0 ;;
    esac
    return 1
}

live_pid_of() {
    # live_pid_of PIDFILE NAME: prints the pid in PIDFILE when it is a live NAME process.
    [ -f "$1" ] || return 1
    local pid
    pid="$(cat "$1" 2>/dev/null)"
    [ -n "$pid" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [ -r "/proc/${pid}/cmdline" ]; then
        tr '\0' ' ' <"/proc/${pid}/cmdline" | grep -q "$2" || return 1
    fi
    printf '%s\n' "$pid"
}

stop_pid() {
    # stop_pid PID NAME: SIGTERM, wait up to 10 s, then SIGKILL.
    local waited=0
    kill "$1" 2>/dev/null || return 0
    while kill -0 "$1" 2>/dev/null && [ "$waited" -lt 100 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -9 "$1" 2>/dev/null || true
    say "$2: stopped (pid $1)"
}

ensure_munge() {
    if munge_up; then
        say "munge: already running"
        return 0
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged || die "munged did not start (log: /var/log/munge/munged.log)"
    local waited=0
    while ! munge_up; do
        [ "$waited" -lt 50 ] || die "munged does not answer (log: /var/log/munge/munged.log)"
        sleep 0.1
        waited=$((waited + 1))
    done
    cp /run/munge/munged.pid "${SLURM_STATE}/munged.pid"
    say "munge: started (pid $(cat /run/munge/munged.pid))"
}

write_slurm_conf() {
    # A configuration for this host as it is now: its name, CPUs and memory (slurmd -C), every
    # daemon as root, and plugins that need no cgroups or systemd (they fail in a container).
    if [ -f "$SLURM_CONF_FILE" ] && ! grep -qF "$SLURM_MARKER" "$SLURM_CONF_FILE"; then
        die "$SLURM_CONF_FILE was not written by this script: start that cluster's own daemons"
    fi
    local node host
    node="$(slurmd -C | head -n 1)"
    host="$(hostname -s)"
    case "$node" in
        NodeName=*) ;;
        *) die "slurmd -C did not describe this node: $node" ;;
    esac
    mkdir -p "$(dirname "$SLURM_CONF_FILE")"
    cat >"${SLURM_CONF_FILE}.tmp" <<EOF
${SLURM_MARKER}
# State, logs and pid files: ${SLURM_STATE}
ClusterName=asynccache
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=${SLURM_STATE}/ctld
SlurmdSpoolDir=${SLURM_STATE}/spool
SlurmctldPidFile=${SLURM_STATE}/slurmctld.pid
SlurmdPidFile=${SLURM_STATE}/slurmd.pid
SlurmctldLogFile=${SLURM_STATE}/slurmctld.log
SlurmdLogFile=${SLURM_STATE}/slurmd.log
${node} NodeAddr=127.0.0.1 State=UNKNOWN
# Up to 4 jobs share each CPU, so a small array runs at once on a small machine.
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    mv -f "${SLURM_CONF_FILE}.tmp" "$SLURM_CONF_FILE"
}

start_slurm_daemon() {
    # start_slurm_daemon NAME: starts slurmctld or slurmd unless ours already runs.
    local pid
    if pid="$(live_pid_of "${SLURM_STATE}/$1.pid" "$1")"; then
        say "$1: already running (pid $pid)"
        return 0
    fi
    "$1" || die "$1 did not start (log: ${SLURM_STATE}/$1.log)"
    say "$1: started (log ${SLURM_STATE}/$1.log)"
}

ensure_slurm() {
    if ! slurm_wanted; then
        say "slurm: left alone (ASYNCCACHE_SLURM=0)"
        return 0
    fi
    if munge_up && slurm_up; then
        say "slurm: already running (node $(hostname -s) $(slurm_node_state))"
        return 0
    fi
    is_root || die "slurm is not running and only root can start it"
    if ! have munged || ! have slurmctld || ! have slurmd || ! have sbatch; then
        apt_install slurm-wlm munge || die "cannot install slurm-wlm and munge with apt-get"
    fi
    mkdir -p "${SLURM_STATE}/ctld" "${SLURM_STATE}/spool"
    ensure_munge
    write_slurm_conf
    start_slurm_daemon slurmctld
    start_slurm_daemon slurmd
    local waited=0 state=""
    while ! slurm_up; do
        state="$(slurm_node_state || true)"
        case "$state" in
            down* | drain* | drained*)
                scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
                ;;
        esac
        if [ "$waited" -ge "$SLURM_WAIT" ]; then
            tail -n 20 "${SLURM_STATE}/slurmctld.log" "${SLURM_STATE}/slurmd.log" >&2 || true
            die "node $(hostname -s) is '${state:-unknown}', not idle, after ${SLURM_WAIT}s"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "slurm: node $(hostname -s) $(slurm_node_state) (config $SLURM_CONF_FILE, state $SLURM_STATE)"
}

stop_slurm() {
    local name pid
    for name in slurmd slurmctld; do
        if pid="$(live_pid_of "${SLURM_STATE}/${name}.pid" "$name")"; then
            stop_pid "$pid" "$name"
        fi
    done
    if pid="$(live_pid_of "${SLURM_STATE}/munged.pid" munged)"; then
        stop_pid "$pid" munged
        rm -f "${SLURM_STATE}/munged.pid"
    fi
    say "slurm: daemons started by this script stopped; others left alone"
}

cmd_up() {
    ensure_packages
    ensure_dockerd
    ensure_registry
    # Slurm only serves the array-job tests: its failure leaves Docker and the registry up and
    # `up` successful; those tests fail under CI when it is missing.
    if ! (ensure_slurm); then
        say "slurm: not available; the Slurm tests will fail under CI (see the error above)" >&2
    fi
}

cmd_down() {
    local pid
    if pid="$(our_registry_pid)"; then
        kill "$pid"
        local waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 50 ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$REGISTRY_PID"
        say "registry: stopped (pid $pid)"
    else
        rm -f "$REGISTRY_PID"
        say "registry: not started by this script, left alone"
    fi
    stop_slurm
    say "dockerd: left running"
}

cmd_status() {
    local rc=0
    if docker_up; then say "dockerd: running"; else say "dockerd: not reachable"; rc=1; fi
    if registry_up; then
        say "registry: running on ${REGISTRY_ADDR}"
    else
        say "registry: not answering on ${REGISTRY_ADDR}"
        rc=1
    fi
    # Slurm is optional: reported, not counted in the exit status.
    if munge_up && slurm_up; then
        say "slurm: node $(hostname -s) $(slurm_node_state)"
    else
        say "slurm: not running (optional)"
    fi
    return "$rc"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        printf 'usage: %s up|down|status\n' "$0" >&2
        exit 2
        ;;
esac
