"""The node's intake alone: listener, spool, state and audit, without workers or sender.

For tests that need the receive path in its own process (resource limits such as
``RLIMIT_FSIZE`` apply to a whole process) without loading a model::

    python -m reliability.intake --config node.yaml

It logs like the node (key=value on stderr) and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Sequence

from app.config import load_config
from app.node.audit import AuditLog
from app.node.listener import Listener
from app.node.logs import setup_logging
from app.node.service import audit_path
from app.node.spool import Spool
from app.node.state import StateStore


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.intake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    settings = load_config(args.config).node
    setup_logging("INFO", hash_uids=settings.log_uids == "hashed")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    state = StateStore(settings.state_db)
    audit = AuditLog(audit_path(settings))
    listener = Listener(settings, Spool(settings.spool_dir), state, audit)
    listener.start()
    while not stop.wait(timeout=0.5):
        pass
    listener.stop(settings.shutdown_grace_s)
    state.close()
    audit.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
