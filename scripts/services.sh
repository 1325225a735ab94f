#!/usr/bin/env bash
# Bring up (or down) the services the tests and the demo need:
#   * a Docker daemon (dockerd), started in the background when `docker info` fails;
#   * a loopback registry (CNCF distribution, Debian's docker-registry) on 127.0.0.1:PORT.
#
# Usage: scripts/services.sh up|down|status
#
# Environment:
#   ASYNCCACHE_REGISTRY_PORT  registry port (default 5000)
#   ASYNCCACHE_STATE_DIR      logs, pid files, registry config and storage
#                             (default /var/tmp/asynccache-services)
#   ASYNCCACHE_DOCKERD_ARGS   extra dockerd flags, e.g. --storage-driver=vfs
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
    have socat || missing+=(socat)
    have pv || missing+=(pv)
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

cmd_up() {
    ensure_packages
    ensure_dockerd
    ensure_registry
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
