"""A storage SCU in its own process, for senders that must really run side by side.

(pynetdicom associations driven from several threads of one process can lose a C-STORE
response; separate processes, like separate modalities, do not share that state.)

    python -m reliability.scu --port 11112 --calling-ae SCU1 [--called-ae PARASPINAL] [--wait] FILE...

It associates, prints ``ready``; with ``--wait`` it then waits for a line on stdin before
sending (so a driver can open all associations first); then sends each file and prints one
JSON line per file: ``{"path": ..., "status": 0 | <failure status> | null}``, and ``done``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.scu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--calling-ae", required=True)
    parser.add_argument("--called-ae", default="PARASPINAL")
    parser.add_argument("--wait", action="store_true", help="wait for a line on stdin before sending")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)

    from reliability.harness import _scu

    paths = [Path(f) for f in args.files]
    ae = _scu(paths, args.calling_ae)
    assoc = ae.associate(args.host, args.port, ae_title=args.called_ae)
    print("ready" if assoc.is_established else "refused", flush=True)
    if args.wait:
        sys.stdin.readline()
    for path in paths:
        status = None
        if assoc.is_established:
            try:
                rsp = assoc.send_c_store(path)
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            except Exception:
                status = None
        print(json.dumps({"path": str(path), "status": status}), flush=True)
    if assoc.is_established:
        assoc.release()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
