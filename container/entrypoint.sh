#!/bin/sh
# Container entry point: `python -m app "$@"` with what the pipeline needs from its process.
# Research software, not a medical device.
set -e
# Holoscan wants a 32 MB stack (thread stacks are sized from the limit at process start).
ulimit -s 32768 2>/dev/null || echo "entrypoint: warning: cannot raise the stack limit to 32 MB (ulimit -s)" >&2
# Under an arbitrary --user the image's HOME may not be writable; Holoscan, CuPy and
# matplotlib keep small caches there.
if [ ! -w "${HOME:-/nonexistent}" ]; then
  HOME="$(mktemp -d /tmp/home.XXXXXX)"
  export HOME
fi
# The node writes spool, state and results under its working directory (a volume): say
# plainly when this user cannot, instead of a traceback later.
case "${1:-}" in
  serve)
    if [ ! -w . ]; then
      echo "error: the working directory $(pwd) is not writable by uid $(id -u) (gid $(id -g)):" \
           "chown the volume mounted there to that uid, or run with --user <owner uid>:<gid>" >&2
      exit 2
    fi ;;
esac
exec python -m app "$@"
