"""The sender: results go to each configured destination by C-STORE (pynetdicom SCU) or,
for a ``kind: dicomweb`` destination, by STOW-RS (:mod:`app.dicomweb`).

Both kinds share one outbox and one policy: the outcome of a STOW-RS request is recorded per
object exactly like a C-STORE's (the per-instance status of the STOW-RS response, or the
HTTP/connection error), so retries, backoff, dead letters and the audit trail are the same.

Each round takes the outbox items that are due, opens one association per destination,
sends each object and records the outcome per object. A failed attempt (association
refused, peer gone, failure status) is retried after ``send_backoff_s * 2**(attempts-1)``
seconds, capped at ``send_backoff_max_s``; after ``1 + send_retries`` attempts the item is
dead-lettered (``status: dead``, shown by ``python -m app status``). A later analysis of the
same study supersedes dead and pending items and queues its own outputs afresh.
"""

from __future__ import annotations

import logging
import ssl
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from app.config import DICOMWEB_KEY_PREFIX, DicomwebDestination, NodeSettings
from app.node.audit import AuditLog
from app.node.logs import log_event, uid_hash
from app.node.state import OutboxItem, StateStore, parse_destination_key

log = logging.getLogger(__name__)

#: Statuses after which the peer holds the object (PS3.4 B.2.3: success and the warnings).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
#: pynetdicom proposes at most 128 presentation contexts per association.
MAX_CONTEXTS = 128


def _file_identity(path: Path) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, Transfer Syntax UID) from a file's meta header."""
    meta = read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)


def _add_contexts(ae: AE, identities: Iterable[tuple[str, str, str]]) -> None:
    """Per SOP class: one context for each transfer syntax the files are in (so each goes
    as it is stored, whatever the peer prefers), and one uncompressed fallback context
    pynetdicom can convert to when the peer refuses a syntax."""
    contexts: list[tuple[str, list[str]]] = []
    for sop_class, _, syntax in identities:
        for wanted in ((sop_class, [syntax]), (sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])):
            if wanted not in contexts:
                contexts.append(wanted)
    for sop_class, syntaxes in contexts[:MAX_CONTEXTS]:
        ae.add_requested_context(sop_class, syntaxes)


def store_files(paths: Sequence[Path], calling_ae: str, called_ae: str, host: str, port: int,
                acse_timeout_s: float = 30.0, dimse_timeout_s: float = 60.0,
                network_timeout_s: float = 60.0, tls_context: ssl.SSLContext | None = None
                ) -> list[tuple[Path, int | None, str]]:
    """C-STORE files over one association (over TLS when ``tls_context`` is given; the peer's
    certificate must then match ``host``).

    Returns one ``(path, status, note)`` per file: ``status`` is the peer's DIMSE status, or
    None when the object could not be sent (unreadable file, no association, no response);
    ``note`` says why in words.
    """
    identities: list[tuple[Path, tuple[str, str, str] | None, str]] = []
    for path in paths:
        try:
            identities.append((Path(path), _file_identity(Path(path)), ""))
        except Exception as exc:
            identities.append((Path(path), None, f"unreadable file: {type(exc).__name__}: {exc}"))
    readable = [ident for _, ident, _ in identities if ident is not None]
    if not readable:
        return [(p, None, note) for p, _, note in identities]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = acse_timeout_s, dimse_timeout_s, network_timeout_s
    _add_contexts(ae, readable)
    assoc = ae.associate(host, port, ae_title=called_ae,
                         tls_args=(tls_context, host) if tls_context is not None else None)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted" if assoc.is_aborted \
            else "association failed (peer unreachable?)"
        return [(p, None, note or why) for p, _, note in identities]
    results: list[tuple[Path, int | None, str]] = []
    try:
        for path, ident, note in identities:
            if ident is None:
                results.append((path, None, note))
                continue
            if not assoc.is_established:
                results.append((path, None, "association lost"))
                continue
            try:
                rsp = assoc.send_c_store(path)
            except (ValueError, AttributeError, OSError) as exc:  # no accepted context, unencodable
                results.append((path, None, f"{type(exc).__name__}: {exc}"))
                continue
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            results.append((path, status, "" if status is not None else "no response (timeout or abort)"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


class Sender:
    """Sends due outbox items and records each outcome.

    Args:
        settings: the node section (AE title used as calling AE, timeouts, retry policy).
        state: the state store holding the outbox.
    """

    def __init__(self, settings: NodeSettings, state: StateStore, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.state = state
        self.audit = audit or AuditLog(None)
        self._tls = {d.outbox_key for d in settings.destinations if getattr(d, "tls", False)}
        self._tls_context: ssl.SSLContext | None = None
        self._dicomweb = {d.outbox_key: d for d in settings.destinations if isinstance(d, DicomwebDestination)}

    def _context_for(self, destination: str) -> ssl.SSLContext | None:
        if destination not in self._tls:
            return None
        if self._tls_context is None:
            from app.node.listener import client_ssl_context

            self._tls_context = client_ssl_context(self.settings)
        return self._tls_context

    def send_due(self, now: float | None = None) -> int:
        """One round: send every due item; returns how many items were attempted."""
        items = self.state.due_items(now)
        by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in items:
            by_destination[item.destination].append(item)
        for destination, batch in by_destination.items():
            self._send_batch(destination, batch)
        return len(items)

    def _current(self, item: OutboxItem) -> bool:
        """The file still holds the object the item was queued for (a newer analysis may have
        replaced the results folder since; its own items then supersede this one)."""
        try:
            return _file_identity(item.path)[1] == item.sop_instance_uid
        except Exception:
            return False

    def _send_batch(self, destination: str, batch: list[OutboxItem]) -> None:
        s = self.settings
        sendable = []
        for item in batch:
            if self._current(item):
                sendable.append(item)
            else:
                self._record(item, destination, None, "result file missing or replaced by a newer analysis")
        if not sendable:
            return
        if destination.startswith(DICOMWEB_KEY_PREFIX):
            self._send_dicomweb(destination, sendable)
            return
        ae_title, host, port = parse_destination_key(destination)
        try:
            tls_context = self._context_for(destination)
        except (OSError, ssl.SSLError) as exc:  # certificate files missing or unreadable
            for item in sendable:
                self._record(item, destination, None, f"TLS set-up failed: {exc}")
            return
        outcomes = store_files([item.path for item in sendable], s.ae_title, ae_title, host, port,
                               s.acse_timeout_s, s.dimse_timeout_s, s.network_timeout_s, tls_context)
        for item, (_, status, note) in zip(sendable, outcomes):
            self._record(item, destination, status, note)

    def _send_dicomweb(self, destination: str, sendable: list[OutboxItem]) -> None:
        """STOW-RS the items; a destination no longer configured fails them (and so, in time,
        dead-letters them) rather than guessing its credentials."""
        service = self._dicomweb.get(destination)
        if service is None:
            for item in sendable:
                self._record(item, destination, None, "DICOMweb destination no longer configured")
            return
        from app.dicomweb import stow_files

        for item, (_, status, note) in zip(sendable, stow_files([item.path for item in sendable], service)):
            self._record(item, destination, status, note)

    def _record(self, item: OutboxItem, destination: str, status: int | None, note: str) -> None:
        """Mark one item sent, or failed (pending again after backoff, or dead), and log it."""
        s = self.settings
        audit = dict(study=uid_hash(item.study_uid), sop=uid_hash(item.sop_instance_uid),
                     sop_class=UID(item.sop_class_uid).name, destination=destination, attempt=item.attempts + 1)
        if status in STORED_STATUSES:
            self.state.mark_sent(item.id, f"0x{status:04X}")
            self.audit.write("send", **audit, result="sent", status=f"0x{status:04X}")
            log_event(log, logging.INFO, "result_sent", study=item.study_uid, sop=item.sop_instance_uid,
                      destination=destination, status=f"0x{status:04X}", attempt=item.attempts + 1)
            return
        error = f"status 0x{status:04X}" if status is not None else note
        after = self.state.mark_failed(item.id, error, s.send_retries, s.send_backoff_s, s.send_backoff_max_s)
        self.audit.write("send", **audit, result={"pending": "retry"}.get(after, after), status=error[:200])
        log_event(log, logging.ERROR if after == "dead" else logging.WARNING,
                  "dead_letter" if after == "dead" else "send_failed", study=item.study_uid,
                  sop=item.sop_instance_uid, destination=destination, error=error, attempt=item.attempts + 1,
                  retries=s.send_retries)
