#!/usr/bin/env bash
# Make a working Docker engine and a local Python base image available on this machine.
#
#   scripts/docker-engine.sh          ensure: engine installed, running, base image built
#   scripts/docker-engine.sh start    the same
#   scripts/docker-engine.sh stop     stop the dockerd that THIS script started (and nothing else)
#   scripts/docker-engine.sh status   say what is there
#
# Idempotent: each step is skipped when its result is already there.
#   1. `dockerd` missing        -> apt-get update; apt-get install docker.io docker-compose iptables debootstrap
#   2. no engine answers        -> start dockerd in the background, PID in $STATE_DIR/dockerd.pid, wait for `docker info`
#   3. base image missing       -> debootstrap a minimal Debian with python3/pip/venv/CA certificates,
#                                  add the host's extra CA certificates, `docker import` it as $BASE_IMAGE
#
# No image registry is reachable here, so `python:3.11-slim` cannot be pulled: the Dockerfile takes
# its base as a build argument and the tests pass $BASE_IMAGE. Stdout carries only the summary lines
# ("engine: ...", "base-image: ..."); progress goes to stderr.
#
# Environment:
#   FASHION_BASE_IMAGE         name:tag of the local base image (default fashion-serve/python-base:bookworm)
#   FASHION_DOCKER_STATE_DIR   where the PID file, the log and the lock live (default /tmp/fashion-serve-docker)
#   FASHION_DEBIAN_SUITE       suite for debootstrap (default: the host's VERSION_CODENAME, else bookworm)
#   FASHION_DEBIAN_MIRROR      mirror for debootstrap (default: the first URI in /etc/apt/sources.list.d/debian.sources)
#   FASHION_DOCKER_WAIT_S      seconds to wait for a started engine (default 60)
set -euo pipefail

BASE_IMAGE="${FASHION_BASE_IMAGE:-fashion-serve/python-base:bookworm}"
STATE_DIR="${FASHION_DOCKER_STATE_DIR:-/tmp/fashion-serve-docker}"
PID_FILE="$STATE_DIR/dockerd.pid"
LOG_FILE="$STATE_DIR/dockerd.log"
LOCK_FILE="$STATE_DIR/lock"
WAIT_S="${FASHION_DOCKER_WAIT_S:-60}"

log() { printf '[docker-engine] %s\n' "$*" >&2; }
say() { printf '%s\n' "$*"; }
die() { printf '[docker-engine] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else die "need root for: $*"
    fi
}

engine_answers() { docker info >/dev/null 2>&1; }

# The PID in our PID file, if that process is still a dockerd.
our_dockerd_pid() {
    [ -f "$PID_FILE" ] || return 1
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    grep -qE "^(dockerd|sudo)$" "/proc/$pid/comm" 2>/dev/null || return 1  # sudo: started as non-root
    printf '%s\n' "$pid"
}

ensure_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v iptables >/dev/null 2>&1 || missing+=(iptables)
    if [ "${#missing[@]}" -eq 0 ]; then
        say "packages: present (dockerd, docker-compose, debootstrap, iptables)"
        return
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "missing ${missing[*]}: apt-get install docker.io docker-compose iptables debootstrap"
    local t0=$SECONDS
    local apt_log="$STATE_DIR/apt.log"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update >"$apt_log" 2>&1 \
        || { tail -n 20 "$apt_log" >&2; die "apt-get update failed (log $apt_log)"; }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        docker.io docker-compose iptables debootstrap >>"$apt_log" 2>&1 \
        || { tail -n 20 "$apt_log" >&2; die "apt-get install docker.io docker-compose iptables debootstrap failed (log $apt_log)"; }
    command -v dockerd >/dev/null 2>&1 || die "dockerd still missing after installing docker.io"
    say "packages: installed docker.io docker-compose iptables debootstrap in $((SECONDS - t0)) s"
}

ensure_engine() {
    if engine_answers; then
        if our_dockerd_pid >/dev/null; then
            say "engine: running (started earlier by this script, pid $(our_dockerd_pid))"
        else
            say "engine: running (not started by this script)"
        fi
        return
    fi
    command -v dockerd >/dev/null 2>&1 || die "no engine answers and dockerd is not installed"
    local pid
    if pid="$(our_dockerd_pid)"; then
        log "dockerd $pid (ours) is alive but not answering yet; waiting"
    else
        log "starting dockerd (log: $LOG_FILE)"
        # setsid: its own session, so a Ctrl-C aimed at the caller does not take the engine down
        # mid-use. Not through a shell function, so that $! is dockerd itself (setsid and nohup exec).
        # 9>&-: the engine must not inherit (and hold forever) the lock taken in cmd_start.
        local sudo=()
        [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
        "${sudo[@]}" setsid nohup dockerd >"$LOG_FILE" 2>&1 </dev/null 9>&- &
        pid=$!
        echo "$pid" >"$PID_FILE"
    fi
    local t0=$SECONDS
    until engine_answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PID_FILE"
            log "dockerd exited; last lines of $LOG_FILE:"
            tail -n 20 "$LOG_FILE" >&2 || true
            die "dockerd could not start (no privileges for namespaces, cgroups or iptables here?)"
        fi
        if [ $((SECONDS - t0)) -ge "$WAIT_S" ]; then
            tail -n 20 "$LOG_FILE" >&2 || true
            die "dockerd (pid $pid) did not answer within ${WAIT_S} s"
        fi
        sleep 0.5
    done
    say "engine: started dockerd pid $pid, ready in $((SECONDS - t0)) s (pid file $PID_FILE)"
}

debian_mirror() {
    if [ -n "${FASHION_DEBIAN_MIRROR:-}" ]; then printf '%s\n' "$FASHION_DEBIAN_MIRROR"; return; fi
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri="$(awk '/^deb / && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)"
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

debian_suite() {
    if [ -n "${FASHION_DEBIAN_SUITE:-}" ]; then printf '%s\n' "$FASHION_DEBIAN_SUITE"; return; fi
    local codename=""
    [ -r /etc/os-release ] && codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
    printf '%s\n' "${codename:-bookworm}"
}

ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base-image: $BASE_IMAGE present ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is needed to build $BASE_IMAGE"
    local suite mirror rootfs t0=$SECONDS
    suite="$(debian_suite)"
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d "${TMPDIR:-/tmp}/fashion-rootfs.XXXXXX")"
    # shellcheck disable=SC2064
    trap "as_root rm -rf --one-file-system '$rootfs'" EXIT
    log "debootstrap $suite from $mirror into $rootfs (a minute or so)"
    as_root debootstrap --variant=minbase \
        --include=python3,python3-pip,python3-venv,ca-certificates \
        "$suite" "$rootfs" "$mirror" >"$STATE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 30 "$STATE_DIR/debootstrap.log" >&2; die "debootstrap failed (log $STATE_DIR/debootstrap.log)"; }

    # HTTPS from builds goes through an intercepting proxy here: trust what the host trusts.
    local n=0 crt
    for crt in /usr/local/share/ca-certificates/*.crt; do
        [ -f "$crt" ] || continue
        as_root cp "$crt" "$rootfs/usr/local/share/ca-certificates/"
        n=$((n + 1))
    done
    as_root chroot "$rootfs" update-ca-certificates >>"$STATE_DIR/debootstrap.log" 2>&1 || die "update-ca-certificates failed in the chroot"

    # Slim it: no package caches, lists, docs, manuals or translations in a base image.
    as_root chroot "$rootfs" apt-get clean >&2 || true
    as_root rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* \
        "$rootfs"/tmp/* "$rootfs"/var/tmp/*
    # An image, not a machine: no leftovers of debootstrap's host view.
    as_root rm -f "$rootfs"/etc/hostname "$rootfs"/etc/machine-id
    as_root touch "$rootfs"/etc/machine-id

    log "importing $rootfs as $BASE_IMAGE"
    as_root tar --numeric-owner -C "$rootfs" -c . | docker import \
        -c 'ENV LANG=C.UTF-8' \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["python3"]' \
        -m "debootstrap --variant=minbase $suite + python3 python3-pip python3-venv ca-certificates (+$n host CA certs)" \
        - "$BASE_IMAGE" >/dev/null || die "docker import failed"
    as_root rm -rf --one-file-system "$rootfs"
    trap - EXIT
    say "base-image: built $BASE_IMAGE from debootstrap $suite ($mirror), $n host CA certs, in $((SECONDS - t0)) s ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

cmd_start() {
    mkdir -p "$STATE_DIR"
    # One caller at a time (two test runs must not both start a dockerd or both debootstrap).
    exec 9>"$LOCK_FILE"
    if command -v flock >/dev/null 2>&1; then flock -w 600 9 || die "could not take $LOCK_FILE"; fi
    ensure_packages
    ensure_engine
    ensure_base_image
}

cmd_stop() {
    local pid
    if ! pid="$(our_dockerd_pid)"; then
        rm -f "$PID_FILE"
        say "engine: nothing to stop (no dockerd started by this script)"
        return
    fi
    log "stopping dockerd $pid"
    as_root kill -TERM "$pid"
    local i
    for i in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "dockerd $pid still alive after 30 s; sending SIGKILL"
        as_root kill -KILL "$pid" || true
    fi
    rm -f "$PID_FILE"
    say "engine: stopped dockerd pid $pid"
}

cmd_status() {
    if engine_answers; then
        if our_dockerd_pid >/dev/null; then say "engine: running (ours, pid $(our_dockerd_pid))"
        else say "engine: running (not ours)"; fi
    else
        say "engine: not answering"
    fi
    if engine_answers && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base-image: $BASE_IMAGE present"
    else
        say "base-image: $BASE_IMAGE absent"
    fi
}

case "${1:-start}" in
    start | ensure | "") cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    base-image) printf '%s\n' "$BASE_IMAGE" ;;
    -h | --help | help) sed -n '2,24p' "$0" ;;
    *) die "unknown command '$1' (start | stop | status | base-image)" ;;
esac
