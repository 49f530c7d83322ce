"""The audit trail: one JSON object per line, appended to ``node.audit_log``, never rewritten.

What is recorded (``event`` field):

* ``association``: a peer's association ended (``outcome`` released or aborted): who
  (calling AE title, address and port, the TLS client certificate's subject when TLS is on),
  when (``started``, ``ended``), and what was received: per study hash the instances stored,
  duplicates (identical re-sends) and refused, plus C-ECHOs;
* ``association_rejected``: a peer was turned away at association (not in the allow-list),
  with the reason;
* ``tls_handshake_failed``: a connection that did not complete DICOM TLS (no or untrusted
  client certificate, plain DICOM on the TLS port), with the reason;
* ``send``: one result object's C-STORE attempt: what (study hash, SOP class, SOP instance
  hash), where (destination), the outcome (``sent``, ``retry``, ``dead``) and the status;
* ``node_started`` / ``node_stopped``;
* site learning: ``correction_accepted`` / ``correction_refused`` / ``correction_ignored``
  (:mod:`app.node.corrections`), ``finetune_started`` / ``finetune_finished``
  (:mod:`app.node.learning`), ``model_promoted`` / ``model_rolled_back``
  (:mod:`app.model_versions`, :mod:`training.finetune`).

Studies and instances are named by :func:`app.node.logs.uid_hash` only; the file holds no
patient data and no UIDs. The file is opened with ``O_APPEND`` (every line lands at the end,
whole, even with several writers), each line is fsynced before the call returns, and the
node never truncates, rotates or rewrites it. To rotate: move the file away and restart the
node, which starts a new one (copy-and-truncate would break the append-only promise).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


def utc_iso(t: float | None = None) -> str:
    """Unix time as ISO 8601 UTC with milliseconds."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


class AuditLog:
    """Appends audit events to ``path`` (None: a no-op log)."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, event: str, **fields: Any) -> None:
        """Append one event (``ts`` and ``event`` first, then ``fields``)."""
        if self._fd is None:
            return
        line = json.dumps({"ts": utc_iso(), "event": event, **fields}, default=str, ensure_ascii=True) + "\n"
        data = line.encode("ascii")
        with self._lock:
            if self._fd is None:
                return
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every event of an audit file, oldest first (a torn last line is skipped)."""
    events = []
    for line in Path(path).read_text(encoding="ascii", errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
