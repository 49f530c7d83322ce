#!/usr/bin/env bash
# Build the node image from this checkout (research software): docker build with the local
# wheel folder and CA bundle staged into wheels/ and certs/.
#   IMAGE (paraspinal-node:dev)  FLAVOUR (cpu|gpu)  BASE_IMAGE (empty: the Dockerfile's default,
#   python:3.11-slim-bookworm; "debian-local": a Debian bookworm base made here with mmdebstrap,
#   for machines that cannot reach Docker Hub)  WHEELS_DIR (/opt/wheels or $PIP_FIND_LINKS)
#   CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt)
# Prints the build time; the build log goes to build/image/build-<flavour>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-paraspinal-node:dev}
FLAVOUR=${FLAVOUR:-cpu}
BASE_IMAGE=${BASE_IMAGE:-}
WHEELS_DIR=${WHEELS_DIR:-${PIP_FIND_LINKS:-/opt/wheels}}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
LOCAL_BASE=paraspinal-base:bookworm-py311
mkdir -p build/image

if [ "$BASE_IMAGE" = debian-local ]; then
  if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    if ! command -v mmdebstrap >/dev/null 2>&1; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get install -y -q --no-install-recommends mmdebstrap \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends mmdebstrap; }
    fi
    echo "build-image: making $LOCAL_BASE (Debian bookworm, python3 3.11) with mmdebstrap"
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' bookworm - 2>build/image/mmdebstrap.log \
      | docker import -c 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
  fi
  BASE_IMAGE=$LOCAL_BASE
fi

# Stage the CPU torch wheel and the CA bundle (both ignored by git).
rm -f wheels/*.whl certs/*.crt
if [ "$FLAVOUR" = cpu ]; then
  for w in "$WHEELS_DIR"/torch-*+cpu-cp311-*.whl; do [ -f "$w" ] && { ln "$w" wheels/ 2>/dev/null || cp "$w" wheels/; }; done
fi
[ -f "$CA_BUNDLE" ] && cp "$CA_BUNDLE" certs/build-host.crt

args=(--network host -t "$IMAGE" --build-arg "FLAVOUR=$FLAVOUR")
[ -n "$BASE_IMAGE" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
start=$(date +%s)
echo "build-image: docker build ${args[*]} . (log: build/image/build-$FLAVOUR.log)"
if ! DOCKER_BUILDKIT=0 docker build "${args[@]}" . >"build/image/build-$FLAVOUR.log" 2>&1; then
  tail -40 "build/image/build-$FLAVOUR.log"; echo "build-image: docker build failed" >&2; exit 1
fi
end=$(date +%s)
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "build-image: $IMAGE built in $((end - start)) s; size $((size / 1000000)) MB"
