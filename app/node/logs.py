"""Structured logs: one line per event, ``key=value`` pairs, no patient identity.

Every record becomes ``ts=... level=... logger=... event=... k=v ...``. Node code calls
:func:`log_event` with an event name and fields; records from other libraries (the
pipeline, pynetdicom) keep their message as ``msg="..."`` so every line parses the same way.
Patient name, ID and birth date are never passed as fields: the node logs UIDs, AE titles,
counts and timings only.

UIDs: with ``node.log_uids: hashed`` (``setup_logging(hash_uids=True)``) every UID outside the
DICOM root ``1.2.840.10008`` (SOP classes and transfer syntaxes stay readable) is replaced by
``uid:<16 hex>``, :func:`uid_hash` of it, in every line, the node's own events and other
libraries' messages alike. The audit log always uses these hashes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
from typing import Any

_EVENT_FIELDS = "node_fields"

#: A UID as it appears in text: digits in three or more dot-separated components, at least
#: ten characters (so numbers, times, versions are left alone; 2.25.<UUID> UIDs are caught).
_UID_IN_TEXT = re.compile(r"(?<![\w.])[0-9]+(?:\.[0-9]+){2,}(?![\w])")
_DICOM_ROOT = "1.2.840.10008."


def _is_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(len(p) <= 3 and int(p) <= 255 for p in parts)


def uid_hash(uid: str) -> str:
    """A pseudonymous reference to a UID: the first 16 hex digits of SHA-256 of its text.

    Unkeyed on purpose: whoever already knows a study's UID (the PACS, an operator running
    ``python -m app status``) can compute it and find the study in the logs; whoever has only
    the logs cannot go back to the UID, let alone to the patient.
    """
    return hashlib.sha256(str(uid).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def scrub_uids(text: str) -> str:
    """``text`` with every non-standard UID replaced by ``uid:<hash>``."""
    def replace(match: re.Match) -> str:
        uid = match.group(0)
        if len(uid) < 10 or uid.startswith(_DICOM_ROOT) or _is_ipv4(uid):
            return uid  # not a UID, or a standard one (SOP class, transfer syntax), or an address
        return f"uid:{uid_hash(uid)}"
    return _UID_IN_TEXT.sub(replace, text)


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """Formats a record as one line of ``key=value`` pairs (UTC timestamps, ms);
    ``hash_uids``: UIDs replaced by their hashes (:func:`scrub_uids`)."""

    def __init__(self, hash_uids: bool = False) -> None:
        super().__init__()
        self.hash_uids = hash_uids

    def format(self, record: logging.LogRecord) -> str:
        line = self._format(record)
        return scrub_uids(line) if self.hash_uids else line

    def _format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={stamp}", f"level={record.levelname}", f"logger={record.name}"]
        fields = getattr(record, _EVENT_FIELDS, None)
        if fields is not None:
            parts += [f"{key}={_quote(value)}" for key, value in fields.items()]
        else:
            parts.append(f"msg={_quote(record.getMessage())}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log one event as ``event=<event>`` followed by ``fields`` in the order given."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_EVENT_FIELDS: {"event": event, **fields}})


def setup_logging(level: str | int = "INFO", hash_uids: bool = False) -> None:
    """Route all logging to stderr as key=value lines (``hash_uids``: see :class:`KeyValueFormatter`).

    pynetdicom is held at WARNING unless DEBUG is asked for: its INFO lines duplicate the
    node's own events in free text, and its DEBUG lines dump data sets (patient data).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(hash_uids))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # library warnings become key=value lines too (and are scrubbed)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if root.level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        # Refused connections are reported by the node's own send_failed/dead_letter events.
        logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
