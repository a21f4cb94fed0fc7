#!/usr/bin/env bash
# A Docker engine for tests on a machine without one: `start` installs Debian's docker.io if dockerd is
# missing and starts dockerd in the background; `stop` stops the one `start` started, by its pid.
# An engine that already answers is used as it is and never stopped.
set -euo pipefail
STATE=${RLSTACK_DOCKERD_STATE:-/tmp/rlstack-dockerd}
PIDFILE=$STATE/dockerd.pid

start() {
    if docker info >/dev/null 2>&1; then
        echo "docker engine already answers; using it"
        return 0
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        echo "installing Debian's docker.io"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >/dev/null; }
    fi
    mkdir -p "$STATE"
    dockerd --pidfile "$PIDFILE" --exec-root "$STATE/exec" >"$STATE/dockerd.log" 2>&1 &
    for _ in $(seq 1 100); do
        docker info >/dev/null 2>&1 && { echo "dockerd started (pid $(cat "$PIDFILE"))"; return 0; }
        sleep 0.2
    done
    echo "dockerd did not answer within 20 s; its log: $STATE/dockerd.log" >&2
    tail -20 "$STATE/dockerd.log" >&2
    return 1
}

stop() {
    [ -f "$PIDFILE" ] || return 0
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    # dockerd leaves an nsfs mount under its exec root
    grep -o "$STATE/exec[^ ]*" /proc/mounts 2>/dev/null | xargs -r -n1 umount 2>/dev/null || true
    rm -f "$PIDFILE"
    echo "dockerd stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
