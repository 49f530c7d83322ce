#!/usr/bin/env bash
# `make map`: package the MAP with holoscan-cli from a clean export of the committed tree (never
# from a working checkout with .venv or build output). Research software, not a medical device.
#   MAP_TAG (paraspinal-node:0.1.0)  MAP_SOURCE (artifacts.json for sites without internet;
#   empty: the packager downloads it)  MAP_ARGS (more `monai-deploy package` arguments)
#   MAP_LAYOUT_ONLY=1: stop before `docker buildx build` and keep the generated build context
#   in build/map/layout (container/map_layout.py).
set -euo pipefail
cd "$(dirname "$0")/.."
MAP_TAG=${MAP_TAG:-paraspinal-node:0.1.0}
PY=${PY:-.venv/bin/python}
out=build/map
rm -rf "$out/src" "$out/models"
mkdir -p "$out/src" "$out/models"
# The application (the packager copies this folder into /opt/holoscan/app) and, apart, the models.
git archive --format=tar HEAD app operators paraspinal config __main__.py app.yaml requirements-runtime.txt \
  | tar -x -C "$out/src"
git archive --format=tar HEAD:models | tar -x -C "$out/models"
# The packager installs <app>/requirements.txt: the runtime pins only (no test tools).
mv "$out/src/requirements-runtime.txt" "$out/src/requirements.txt"
echo "package-map: exported $(git rev-parse --short HEAD) to $out/src (+ $out/models)"
args=("$out/src" -c "$out/src/app.yaml" -m "$out/models" -t "$MAP_TAG" --platform x86_64)
[ -n "${MAP_SOURCE:-}" ] && args+=(--source "$MAP_SOURCE")
# shellcheck disable=SC2206
[ -n "${MAP_ARGS:-}" ] && args+=($MAP_ARGS)
if [ "${MAP_LAYOUT_ONLY:-0}" = 1 ]; then
  exec "$PY" -m container.map_layout "$out/layout" -- "${args[@]}"
fi
exec "$(dirname "$PY")/monai-deploy" package "${args[@]}"
