#!/usr/bin/env bash
# Find or start a Docker engine for the image build and test; print the DOCKER_HOST to use.
#   eval "$(container/engine.sh start)"   # exports DOCKER_HOST (empty: the default engine answers)
#   container/engine.sh stop              # stops the private engine this script started
# When no engine answers, a private dockerd is started as root (installing Debian's docker.io
# when missing), with its state under $PARASPINAL_DOCKER_ROOT (default /var/tmp/paraspinal-docker)
# and no bridge or iptables (builds and containers use --network host). Exit 3, with the reason
# on stderr, when no engine can start here.
set -euo pipefail
ROOT=${PARASPINAL_DOCKER_ROOT:-/var/tmp/paraspinal-docker}
SOCK="unix://$ROOT/docker.sock"
why() { echo "engine.sh: no container engine: $*" >&2; exit 3; }

start() {
  if command -v docker >/dev/null 2>&1 && docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    echo "export DOCKER_HOST=${DOCKER_HOST:-}"; return; fi
  if DOCKER_HOST=$SOCK docker version >/dev/null 2>&1; then echo "export DOCKER_HOST=$SOCK"; return; fi
  [ "$(id -u)" = 0 ] || why "none answers and starting dockerd needs root (uid $(id -u))"
  if ! command -v dockerd >/dev/null 2>&1; then
    echo "engine.sh: installing docker.io" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >&2; } \
      || why "apt-get install docker.io failed"
  fi
  mkdir -p "$ROOT"
  dockerd --data-root "$ROOT/data" --exec-root "$ROOT/exec" -H "$SOCK" --pidfile "$ROOT/dockerd.pid" \
    --storage-driver overlay2 --iptables=false --ip6tables=false --bridge=none --ip-forward=false \
    --ip-masq=false >"$ROOT/dockerd.log" 2>&1 &
  for _ in $(seq 60); do
    if DOCKER_HOST=$SOCK docker version >/dev/null 2>&1; then
      echo "export DOCKER_HOST=$SOCK PARASPINAL_ENGINE_STARTED=1"; return; fi
    kill -0 $! 2>/dev/null || why "dockerd exited: $(tail -3 "$ROOT/dockerd.log" | tr '\n' ' ')"
    sleep 1
  done
  why "dockerd did not answer within 60 s: $(tail -3 "$ROOT/dockerd.log" | tr '\n' ' ')"
}

stop() {
  [ -f "$ROOT/dockerd.pid" ] || return 0
  pid=$(cat "$ROOT/dockerd.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  # dockerd leaves its network namespace mounted; without this the folder cannot be removed.
  umount "$ROOT/exec/netns/default" 2>/dev/null || true
}

case "${1:-start}" in start) start ;; stop) stop ;; *) echo "usage: $0 start|stop" >&2; exit 2 ;; esac
