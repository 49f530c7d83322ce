"""Structured logs: one line per event, ``key=value`` pairs, no patient identity.

Every record becomes ``ts=... level=... logger=... event=... k=v ...``. Node code calls
:func:`log_event` with an event name and fields; records from other libraries (the
pipeline, pynetdicom) keep their message as ``msg="..."`` so every line parses the same way.
Patient name, ID and birth date are never passed as fields: the node logs UIDs, AE titles,
counts and timings only.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_EVENT_FIELDS = "node_fields"


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """Formats a record as one line of ``key=value`` pairs (UTC timestamps, ms)."""

    def format(self, record: logging.LogRecord) -> str:
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


def setup_logging(level: str | int = "INFO") -> None:
    """Route all logging to stderr as key=value lines.

    pynetdicom is held at WARNING unless DEBUG is asked for: its INFO lines duplicate the
    node's own events in free text, and its DEBUG lines dump data sets (patient data).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if root.level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        # Refused connections are reported by the node's own send_failed/dead_letter events.
        logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
