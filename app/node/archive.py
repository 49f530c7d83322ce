"""A small local archive: a Storage SCP that files whatever it receives into a folder.

It stands in for the PACS in the demo (``python -m app demo``) and anywhere a destination
is needed without a real PACS. Files are stored exactly as received, atomically, in the
spool layout ``<dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

Every C-STORE it answers can be journalled (``--journal``: one JSON line per reception with
the SOP Instance UID, study, SOP class, the outcome and the SHA-256 of the bytes), so a test
can count how often each object arrived; ``--store-delay`` slows each C-STORE down (to
stand in for a slow PACS).

Run::

    python -m app.node.archive --dir build/archive --port 11113 --ae-title ARCHIVE
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from app.node.logs import log_event, setup_logging
from app.node.spool import InvalidUID, Spool, validate_uid

log = logging.getLogger(__name__)


class Archive:
    """A folder behind a Storage SCP (all storage SOP classes, all transfer syntaxes).

    Args:
        root: the folder instances are filed into.
        ae_title: the archive's AE title.
        bind_address: address to listen on.
        port: TCP port (0: any free port; see :attr:`port`).
    """

    def __init__(self, root: Path, ae_title: str = "ARCHIVE", bind_address: str = "127.0.0.1", port: int = 0,
                 journal: Path | None = None, store_delay_s: float = 0.0) -> None:
        self.spool = Spool(root)
        self.journal = Path(journal) if journal else None
        self.store_delay_s = store_delay_s
        self._journal_lock = threading.Lock()
        self.ae_title = ae_title
        self.bind_address = bind_address
        self.requested_port = port
        self.ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("archive not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._server = self.ae.start_server((self.bind_address, self.requested_port), block=False,
                                            evt_handlers=[(evt.EVT_C_STORE, self.handle_store)])
        log_event(log, logging.INFO, "archive_started", ae_title=self.ae_title, address=self.bind_address,
                  port=self.port, dir=self.spool.root)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log_event(log, logging.INFO, "archive_stopped")

    def handle_store(self, event: Event) -> int:
        """File one instance; 0xC000 when its UIDs cannot name a file."""
        if self.store_delay_s:
            time.sleep(self.store_delay_s)
        try:
            ds = event.dataset
            data = event.encoded_dataset()
            stored = self.spool.store(validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
                                      validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
                                      validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
                                      data)
        except InvalidUID as exc:
            log_event(log, logging.WARNING, "archive_refused", status="0xC000", reason=str(exc))
            return 0xC000
        except OSError as exc:
            log_event(log, logging.ERROR, "archive_refused", status="0xA700", reason=str(exc))
            return 0xA700
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        if self.journal is not None:
            line = json.dumps({"ts": time.time(), "sop": str(ds.SOPInstanceUID), "study": str(ds.StudyInstanceUID),
                               "sop_class": str(event.request.AffectedSOPClassUID), "outcome": stored.outcome,
                               "sha256": hashlib.sha256(data[132:]).hexdigest(), "calling_ae": calling_ae})
            with self._journal_lock, open(self.journal, "a") as handle:
                handle.write(line + "\n")
        log_event(log, logging.INFO, "archived", calling_ae=calling_ae,
                  sop_class=str(event.request.AffectedSOPClassUID), path=stored.path, outcome=stored.outcome)
        return 0x0000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.node.archive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="folder to file received instances into")
    parser.add_argument("--ae-title", default="ARCHIVE")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=11113)
    parser.add_argument("--journal", help="append one JSON line per reception to this file")
    parser.add_argument("--store-delay", type=float, default=0.0, help="seconds to wait before answering each C-STORE")
    parser.add_argument("-l", "--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    archive = Archive(Path(args.dir), args.ae_title, args.bind, args.port, args.journal, args.store_delay)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    archive.start()
    while not stop.wait(timeout=1.0):
        pass
    archive.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
