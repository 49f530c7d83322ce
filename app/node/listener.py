"""The listener: a pynetdicom Storage SCP (MR, Enhanced MR, Legacy Converted Enhanced MR, Segmentation) and Verification SCP.

Each handler does one thing and returns a status:

* ``EVT_REQUESTED``: a calling peer not in ``allowed_peers`` (AE title, and host when given)
  gets an A-ASSOCIATE-RJ (rejected-permanent, service-user, calling AE title not recognised);
* ``EVT_C_ECHO``: success;
* ``EVT_C_STORE``: check the data set (:func:`inspect_dataset`: size, every element
  readable, SOP class and UIDs), write the bytes exactly as received to the spool (durably),
  record the arrival in the state database, and only then answer 0x0000.

Failure statuses (PS3.4 Annex B.2.3, PS3.7 Annex C): 0xA700 out of resources (data set over
``max_dataset_mb``, spool disk below ``min_free_disk_mb``, the write or the database failed),
0xA900 data set does not match SOP class, 0xC000 cannot understand (unreadable data set; a
Study, Series or SOP Instance UID missing, malformed or not matching the request), 0x0124
not authorised (the health-check AE title may only C-ECHO).

Transport limits: the node announces ``max_pdu_size`` as its Maximum Length and aborts a peer
that sends a longer P-DATA-TF PDU, another PDU over 1 MiB, or more than twice
``max_dataset_mb`` of one data set (so a peer cannot make it buffer unbounded data); with
``tls_enabled`` the TLS handshake runs in the association's own thread, bounded by
``acse_timeout_s``, so a client that never completes it blocks nobody.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import sqlite3
import ssl
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    SegmentationStorage,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from app.config import AllowedPeer, NodeSettings
from app.node.audit import AuditLog, utc_iso
from app.node.corrections import ReceivedSeg
from app.node.logs import log_event, uid_hash
from app.node.net import PeerCertificate, certificate_binding_refusal
from app.node.spool import InvalidUID, Spool, validate_uid
from app.node.state import InstanceArrival, StateStore
from paraspinal.levels import labels_spine_levels

log = logging.getLogger(__name__)

#: MR images (classic, Enhanced and Legacy Converted Enhanced multi-frame), and Segmentation for a
#: SEG that labels the lumbar vertebrae/discs on the images' frame of reference (the lumbar level
#: source, ``paraspinal.levels``).
STORAGE_SOP_CLASSES = (MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage,
                       SegmentationStorage)

#: Transfer syntaxes accepted for storage, in order of preference.
ACCEPTED_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,        # 1.2.840.10008.1.2.1
    ImplicitVRLittleEndian,        # 1.2.840.10008.1.2
    DeflatedExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1.99
    JPEGBaseline8Bit,              # 1.2.840.10008.1.2.4.50
    JPEGExtended12Bit,             # 1.2.840.10008.1.2.4.51
    JPEGLossless,                  # 1.2.840.10008.1.2.4.57 (process 14)
    JPEGLosslessSV1,               # 1.2.840.10008.1.2.4.70 (process 14, selection value 1)
    JPEGLSLossless,                # 1.2.840.10008.1.2.4.80
    JPEGLSNearLossless,            # 1.2.840.10008.1.2.4.81
    JPEG2000Lossless,              # 1.2.840.10008.1.2.4.90
    JPEG2000,                      # 1.2.840.10008.1.2.4.91
    RLELossless,                   # 1.2.840.10008.1.2.5
)

STATUS_SUCCESS = 0x0000
STATUS_NOT_AUTHORIZED = 0x0124
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: Longest non-P-DATA PDU accepted (an A-ASSOCIATE-RQ is a few KiB), bytes.
MAX_CONTROL_PDU_BYTES = 1024 * 1024
#: Deepest nesting of sequences accepted in a data set.
MAX_SEQUENCE_DEPTH = 32
MIB = 1024 * 1024



# ---- checking a data set (pure: used by the handler and by the fuzzers) --------------------


class Refusal(Exception):
    """A C-STORE the node refuses: the status to answer and the reason to log (no values)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_dataset` found in an acceptable data set."""

    study_uid: str
    series_uid: str
    sop_uid: str
    dataset: Dataset


def _inflate(data: bytes, limit: int) -> bytes:
    """Inflate a deflated data set, refusing one that inflates to more than ``limit`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"unreadable data set: deflate stream broken ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise Refusal(STATUS_OUT_OF_RESOURCES, f"deflated data set inflates to more than {limit / MIB:g} MiB")
    if not inflater.eof:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "unreadable data set: deflate stream incomplete")
    return out


UNDEFINED_LENGTH = 0xFFFFFFFF


def _check_raw(raw, tag) -> None:
    """A value shorter than its length field says: the data set was cut off (pydicom reads
    such a value without complaint)."""
    if (isinstance(raw, RawDataElement) and raw.length != UNDEFINED_LENGTH and raw.value is not None
            and len(raw.value) != raw.length):
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"unreadable data set: element {tag} truncated "
                                                f"({len(raw.value)} of {raw.length} bytes)")


def _end_of(raw) -> int | None:
    """Offset just past a top-level raw element (None when it cannot be told)."""
    if not isinstance(raw, RawDataElement) or raw.value is None:
        return None
    if raw.length == UNDEFINED_LENGTH:
        return raw.value_tell + len(raw.value) + 8  # the value, then the sequence delimitation item
    return raw.value_tell + raw.length


def _read_every_element(ds: Dataset, depth: int = 0) -> None:
    """Convert every element (recursively into sequences): an unreadable or truncated one
    raises Refusal naming its tag (never its value)."""
    if depth > MAX_SEQUENCE_DEPTH:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"unreadable data set: sequences nested deeper than "
                                                f"{MAX_SEQUENCE_DEPTH}")
    for tag in list(ds.keys()):
        _check_raw(ds.get_item(tag), tag)
        try:
            elem = ds[tag]
            value = elem.value
        except Exception as exc:
            raise Refusal(STATUS_CANNOT_UNDERSTAND,
                          f"unreadable data set: element {tag} ({type(exc).__name__})") from None
        if elem.VR == "SQ" and value is not None:
            for item in value:
                _read_every_element(item, depth + 1)


def inspect_dataset(raw: bytes, transfer_syntax: str, sop_class_rq: str, sop_uid_rq: str,
                    max_bytes: int) -> Inspection:
    """Check one received data set before it may be spooled.

    Args:
        raw: the data set as encoded by the peer (no file meta).
        transfer_syntax: the presentation context's transfer syntax.
        sop_class_rq, sop_uid_rq: Affected SOP Class/Instance UID of the C-STORE request.
        max_bytes: largest data set accepted (encoded, and inflated when deflated).

    Raises:
        Refusal: with the status to answer and a reason that names the problem.
    """
    if len(raw) > max_bytes:
        raise Refusal(STATUS_OUT_OF_RESOURCES, f"data set of {len(raw) / MIB:.1f} MiB exceeds the limit of "
                                               f"{max_bytes / MIB:g} MiB (max_dataset_mb)")
    syntax = UID(transfer_syntax)
    data = _inflate(raw, max_bytes) if syntax == DeflatedExplicitVRLittleEndian else raw
    try:
        ds = read_dataset(io.BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
    except Exception as exc:  # pydicom raises many kinds on broken input
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"unreadable data set ({type(exc).__name__})") from None
    if len(ds) == 0:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "unreadable data set: no elements")
    last = ds.get_item(list(ds.keys())[-1])
    end = _end_of(last)
    if end is not None and end != len(data):
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"unreadable data set: {len(data) - end} byte(s) after the last "
                                                f"complete element (cut off in an element header?)")
    _read_every_element(ds)
    try:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class != str(sop_class_rq):
            raise Refusal(STATUS_DOES_NOT_MATCH_SOP_CLASS,
                          f"SOPClassUID {sop_class[:70]!r} differs from the request's {str(sop_class_rq)[:70]!r}")
        study_uid = validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop_uid = validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    except InvalidUID as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, str(exc)) from None
    if sop_uid != str(sop_uid_rq):
        raise Refusal(STATUS_CANNOT_UNDERSTAND,
                      f"SOPInstanceUID {sop_uid} differs from the request's {str(sop_uid_rq)[:80]!r}")
    return Inspection(study_uid, series_uid, sop_uid, ds)


# ---- who may connect ------------------------------------------------------------------------


def _addresses(host: str) -> frozenset[str]:
    """The IP addresses a configured host stands for (a literal address, or a name resolved once)."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None))
    except OSError:
        log_event(log, logging.WARNING, "allowed_peer_unresolved", host=host)
        return frozenset()


def _is_local(address: str, bind_address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or address == bind_address or (
        isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


class PeerPolicy:
    """Who may associate: empty ``allowed`` means anyone; ``health_ae`` is always admitted
    from the node's own addresses (loopback or ``bind_address``)."""

    def __init__(self, allowed: tuple[AllowedPeer, ...], health_ae: str = "", bind_address: str = "") -> None:
        self._rules = [(p.ae_title.strip(), _addresses(p.host) if p.host else None) for p in allowed]
        self.health_ae = health_ae.strip()
        self.bind_address = bind_address

    def allows(self, calling_ae: str, address: str) -> bool:
        calling_ae = calling_ae.strip()
        if self.health_ae and calling_ae == self.health_ae and _is_local(address, self.bind_address):
            return True
        if not self._rules:
            return True
        return any(ae == calling_ae and (hosts is None or address in hosts) for ae, hosts in self._rules)


def server_ssl_context(settings: NodeSettings) -> ssl.SSLContext:
    """The listener's TLS context: the node's certificate, TLS 1.2 or newer, and (by default)
    a client certificate signed by one of ``tls_ca_certificates`` required from every peer."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_certificate), str(settings.tls_private_key))
    if settings.tls_ca_certificates:
        ctx.load_verify_locations(cafile=str(settings.tls_ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if settings.tls_require_client_certificate else (
        ssl.CERT_OPTIONAL if settings.tls_ca_certificates else ssl.CERT_NONE)
    return ctx


def client_ssl_context(settings: NodeSettings) -> ssl.SSLContext:
    """TLS context for the node as a client (sender, health check): verifies the peer against
    ``tls_ca_certificates`` and presents the node's certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_ca_certificates:
        ctx.load_verify_locations(cafile=str(settings.tls_ca_certificates))
    else:
        ctx.load_default_certs()
    if settings.tls_certificate and settings.tls_private_key:
        ctx.load_cert_chain(str(settings.tls_certificate), str(settings.tls_private_key))
    return ctx


def _subject(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert() or {}
    parts = [f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts)


# ---- transport guard ------------------------------------------------------------------------


class PduGuard:
    """Watches the PDUs one association's socket delivers (header, then body, as pynetdicom
    reads them) and stops the association when a limit is broken.

    A violation makes the header read return nothing, which pynetdicom treats as the
    connection closing: the association is aborted, nothing more is buffered.
    """

    def __init__(self, max_pdu: int, max_message_bytes: int) -> None:
        self.max_pdu = max_pdu
        self.max_message_bytes = max_message_bytes
        self.message_bytes = 0
        self.violation: str | None = None
        self._pending: tuple[int, int] | None = None

    def check_header(self, pdu_type: int, length: int) -> str | None:
        if pdu_type == 0x04:
            if self.max_pdu and length > self.max_pdu:
                return f"P-DATA-TF PDU of {length} bytes exceeds the announced maximum length {self.max_pdu}"
            if self.message_bytes + length > self.max_message_bytes:
                return (f"data set exceeds {self.max_message_bytes / MIB:g} MiB (twice max_dataset_mb) "
                        f"while still arriving")
        elif length > MAX_CONTROL_PDU_BYTES:
            return f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds {MAX_CONTROL_PDU_BYTES} bytes"
        return None

    def account(self, body: bytes | bytearray) -> None:
        """Count the data set fragments of a P-DATA-TF body; a last fragment ends the message."""
        offset = 0
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, offset)
            control = body[offset + 5]
            if not control & 0x01:  # data set fragment (bit 0 clear; set: command)
                self.message_bytes += max(0, item_length - 2)
                if control & 0x02:
                    self.message_bytes = 0
            offset += 4 + item_length

    def wrap(self, sock) -> None:
        """Route ``sock.recv`` (an AssociationSocket) through the guard."""
        original = sock.recv

        def recv(nr_bytes: int) -> bytearray:
            if self.violation is not None:
                return bytearray()
            if self._pending is None:
                data = original(nr_bytes)
                if len(data) == 6:
                    pdu_type, _, length = struct.unpack(">BBL", bytes(data))
                    self.violation = self.check_header(pdu_type, length)
                    if self.violation is not None:
                        return bytearray()
                    self._pending = (pdu_type, length)
                return data
            pdu_type, _ = self._pending
            self._pending = None
            data = original(nr_bytes)
            if pdu_type == 0x04:
                self.account(data)
            return data

        sock.recv = recv


class _NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, plus: the TLS handshake in this thread with a timeout,
    and the PDU guard on the association's socket."""

    def handle(self) -> None:
        listener: Listener = self.server.node_listener  # type: ignore[attr-defined]
        tls_subject = ""
        if isinstance(self.request, ssl.SSLSocket):
            ok, tls_subject = listener.tls_handshake(self.request, self.client_address)
            if not ok:
                self.server.shutdown_request(self.request)
                return
        assoc = self._create_association()
        assoc.node_tls_subject = tls_subject  # type: ignore[attr-defined]
        assoc.node_guard = PduGuard(listener.settings.max_pdu_size, listener.hard_message_cap)  # type: ignore
        assoc.node_guard.wrap(assoc.dul.socket)  # type: ignore[attr-defined]
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class _NodeServer(ThreadedAssociationServer):
    """Accepts TLS connections without handshaking in the accept loop (see the handler)."""

    node_listener: "Listener"

    def get_request(self):
        client_socket, address = self.socket.accept()
        # Nagle off: pynetdicom writes each PDU with one send(), and a small PDU written while an
        # earlier one is still unacknowledged would wait for the peer's delayed ACK (~40 ms).
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True,
                                                         do_handshake_on_connect=False)
        return client_socket, address


# ---- the listener ---------------------------------------------------------------------------


@dataclass
class _AssociationRecord:
    """What one association did, for its audit line."""

    calling_ae: str
    called_ae: str
    address: str
    port: int
    tls_subject: str
    started: float
    studies: dict[str, dict[str, int]] = field(default_factory=dict)
    echoes: int = 0

    def count(self, study_uid: str | None, what: str) -> None:
        key = uid_hash(study_uid) if study_uid else "unknown"
        entry = self.studies.setdefault(key, {"stored": 0, "duplicate": 0, "refused": 0})
        entry[what] += 1


class Listener:
    """The node's DICOM server.

    Args:
        settings: the ``node`` configuration section (AE title, address, port, peers, timeouts,
            limits, TLS).
        spool: where instances are written.
        state: where arrivals are recorded.
        audit: the audit trail (default: none).
    """

    def __init__(self, settings: NodeSettings, spool: Spool, state: StateStore, audit: AuditLog | None = None,
                 seg_sink: Callable[[ReceivedSeg], None] | None = None) -> None:
        self.settings = settings
        #: where a spooled SEG that is no level source goes (a possible correction; app.node.corrections)
        self.seg_sink = seg_sink
        self.spool = spool
        self.state = state
        self.audit = audit or AuditLog(None)
        self.policy = PeerPolicy(settings.allowed_peers, settings.health_check_ae_title, settings.bind_address)
        self.max_dataset_bytes = int(settings.max_dataset_mb * MIB)
        self.hard_message_cap = 2 * self.max_dataset_bytes + MIB
        self.ae = self._build_ae()
        self._server: _NodeServer | None = None
        self._records: dict[int, _AssociationRecord] = {}
        self._records_lock = threading.Lock()

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_size
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        return ae

    @property
    def port(self) -> int:
        """The bound TCP port (useful when the configuration asked for port 0)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads."""
        # The node parses data sets only to check them: invalid values are not worth a warning
        # each, and such a warning quotes the value, which may be patient data. (pydicom's
        # setting is per process; it only silences warnings, reading is the same.)
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        s = self.settings
        handlers = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_closed),
        ]
        ssl_context = server_ssl_context(s) if s.tls_enabled else None
        server = self.ae.make_server((s.bind_address, s.port), ssl_context=ssl_context, evt_handlers=handlers,
                                     server_class=_NodeServer, request_handler=_NodeRequestHandler)
        server.node_listener = self
        thread = threading.Thread(target=server.serve_forever, daemon=True,
                                  name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}")
        thread.start()
        self.ae._servers.append(server)
        self._server = server
        log_event(log, logging.INFO, "listener_started", ae_title=s.ae_title, address=s.bind_address, port=self.port,
                  allowed_peers=len(s.allowed_peers) or "any", max_associations=s.max_associations,
                  tls="on" if s.tls_enabled else "off", max_pdu_size=s.max_pdu_size, max_dataset_mb=s.max_dataset_mb)

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server is not None else 0

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting; give open associations up to ``grace_s`` to finish, then abort them.

        An aborted transfer loses nothing: an instance is acknowledged only once it is spooled
        and recorded, and the peer re-sends what was not acknowledged.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # no new connections; running associations go on in their threads
        deadline = time.monotonic() + max(0.0, grace_s)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        remaining = server.active_associations
        for assoc in remaining:
            assoc.abort()
        log_event(log, logging.INFO, "listener_stopped", aborted_associations=len(remaining))

    # ---- TLS ---------------------------------------------------------------------------------

    def tls_handshake(self, sock: ssl.SSLSocket, client_address) -> tuple[bool, str]:
        """Complete the server side of the TLS handshake within ``acse_timeout_s``."""
        previous = sock.gettimeout()
        address = f"{client_address[0]}:{client_address[1]}"
        try:
            sock.settimeout(self.settings.acse_timeout_s)
            sock.do_handshake()
            sock.settimeout(previous)
        except (ssl.SSLError, OSError) as exc:
            reason = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"[:200]
            log_event(log, logging.WARNING, "tls_handshake_failed", peer=address, reason=reason)
            self.audit.write("tls_handshake_failed", peer_address=client_address[0], peer_port=client_address[1],
                             reason=reason)
            return False, ""
        return True, _subject(sock)

    # ---- handlers ----------------------------------------------------------------------------

    def handle_requested(self, event: Event) -> None:
        """Reject a calling peer that is not allowed, before any negotiation."""
        assoc = event.assoc
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        if not self.policy.allows(calling_ae, assoc.requestor.address):
            # rejected-permanent, DUL service-user, calling AE title not recognised
            self._reject(assoc, calling_ae, "calling peer not in allowed_peers", (0x01, 0x01, 0x03))
        elif self.settings.tls_enabled:  # an AE title bound to a client certificate (net.py)
            refusal = certificate_binding_refusal(self.settings.allowed_peers, calling_ae,
                                                  PeerCertificate.of(assoc.dul.socket.socket))
            if refusal:
                self._reject(assoc, calling_ae, refusal, (0x01, 0x01, 0x03))

    def _reject(self, assoc, calling_ae: str, reason: str, result_source_reason: tuple[int, int, int]) -> None:
        address = assoc.requestor.address
        log_event(log, logging.WARNING, "association_rejected", calling_ae=calling_ae, peer=address, reason=reason)
        self.audit.write("association_rejected", calling_ae=calling_ae, peer_address=address,
                         peer_port=assoc.requestor.port, reason=reason)
        assoc.acse.send_reject(*result_source_reason)
        assoc.kill()

    def _record(self, event: Event) -> _AssociationRecord | None:
        with self._records_lock:
            return self._records.get(id(event.assoc))

    def handle_accepted(self, event: Event) -> None:
        assoc = event.assoc
        record = _AssociationRecord(
            calling_ae=str(assoc.requestor.ae_title).strip(), called_ae=str(assoc.acceptor.ae_title).strip(),
            address=assoc.requestor.address, port=assoc.requestor.port,
            tls_subject=getattr(assoc, "node_tls_subject", ""), started=time.time())
        with self._records_lock:
            self._records[id(assoc)] = record
        log_event(log, logging.INFO, "association_accepted", calling_ae=record.calling_ae,
                  peer=f"{record.address}:{record.port}", contexts=len(assoc.accepted_contexts),
                  max_pdu=assoc.requestor.maximum_length, tls_subject=record.tls_subject or "-")

    def handle_closed(self, event: Event) -> None:
        assoc = event.assoc
        aborted = event.event is evt.EVT_ABORTED
        guard: PduGuard | None = getattr(assoc, "node_guard", None)
        fields = dict(calling_ae=str(assoc.requestor.ae_title).strip(),
                      peer=f"{assoc.requestor.address}:{assoc.requestor.port}")
        if guard is not None and guard.violation:
            fields["reason"] = guard.violation
        log_event(log, logging.WARNING if guard is not None and guard.violation else logging.INFO,
                  "association_" + ("aborted" if aborted else "released"), **fields)
        with self._records_lock:
            record = self._records.pop(id(assoc), None)
        if record is None:
            return
        totals = {k: sum(s[k] for s in record.studies.values()) for k in ("stored", "duplicate", "refused")}
        self.audit.write(
            "association", outcome="aborted" if aborted else "released", calling_ae=record.calling_ae,
            called_ae=record.called_ae, peer_address=record.address, peer_port=record.port,
            tls=self.settings.tls_enabled,
            tls_subject=record.tls_subject, started=utc_iso(record.started), ended=utc_iso(),
            **totals, echoes=record.echoes, studies=record.studies,
            **({"reason": guard.violation} if guard is not None and guard.violation else {}))

    def handle_echo(self, event: Event) -> int:
        record = self._record(event)
        if record is not None:
            record.echoes += 1
        log_event(log, logging.INFO, "echo", calling_ae=str(event.assoc.requestor.ae_title).strip())
        return STATUS_SUCCESS

    def _refuse(self, record: _AssociationRecord | None, status: int, calling_ae: str, reason: str,
                study_uid: str | None = None, sop_uid: str | None = None, level: int = logging.WARNING) -> int:
        if record is not None:
            record.count(study_uid, "refused")
        fields = {"status": f"0x{status:04X}", "calling_ae": calling_ae}
        if study_uid:
            fields["study"] = study_uid
        if sop_uid:
            fields["sop"] = sop_uid
        log_event(log, level, "store_refused", **fields, reason=reason)
        return status

    def handle_store(self, event: Event) -> int:
        """Check, spool durably and record one instance; the status goes back only after all three."""
        assoc = event.assoc
        calling_ae = str(assoc.requestor.ae_title).strip()
        record = self._record(event)
        request = event.request
        if self.policy.health_ae and calling_ae == self.policy.health_ae:
            return self._refuse(record, STATUS_NOT_AUTHORIZED, calling_ae,
                                "the health-check AE title may only C-ECHO")
        try:
            raw = request.DataSet.getvalue() if request.DataSet is not None else b""
            found = inspect_dataset(raw, str(event.context.transfer_syntax), str(request.AffectedSOPClassUID or ""),
                                    str(request.AffectedSOPInstanceUID or ""), self.max_dataset_bytes)
        except Refusal as refusal:
            return self._refuse(record, refusal.status, calling_ae, refusal.reason)
        except Exception as exc:  # never let a data set take the handler down
            return self._refuse(record, STATUS_CANNOT_UNDERSTAND, calling_ae,
                                f"unreadable data set ({type(exc).__name__})")
        study_uid, series_uid, sop_uid = found.study_uid, found.series_uid, found.sop_uid

        free_mb = self.spool.free_mb()
        if free_mb < self.settings.min_free_disk_mb:
            return self._refuse(record, STATUS_OUT_OF_RESOURCES, calling_ae,
                                f"spool disk low: {free_mb:.0f} MiB free, min_free_disk_mb "
                                f"{self.settings.min_free_disk_mb}", study_uid, sop_uid, logging.ERROR)
        transfer_syntax = str(event.context.transfer_syntax)
        sop_class = str(request.AffectedSOPClassUID)
        # A SEG matters only as a lumbar level source; any other (the node's own muscle SEG that a
        # PACS routed back) is kept but must not make the study be analysed again: no loop.
        triggers = sop_class != SegmentationStorage or labels_spine_levels(found.dataset)
        # File and record under the study's lock: retention never removes a study between the two.
        with self.spool.study_lock(study_uid):
            try:
                # The bytes as received: preamble, file meta from the negotiated context, data set
                # exactly as the peer encoded it (no decode/re-encode, so nothing can change).
                stored = self.spool.store(study_uid, series_uid, sop_uid, event.encoded_dataset())
            except OSError as exc:
                return self._refuse(record, STATUS_OUT_OF_RESOURCES, calling_ae,
                                    f"spool write failed: {type(exc).__name__}: {exc.strerror or exc}",
                                    study_uid, sop_uid, logging.ERROR)
            try:
                study_status = self.state.record_instance(InstanceArrival(
                    study_uid=study_uid, series_uid=series_uid, sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class, transfer_syntax=transfer_syntax,
                    size=stored.size, outcome=stored.outcome, calling_ae=calling_ae, triggers_analysis=triggers))
            except sqlite3.Error as exc:
                # Unrecorded, the instance would never be analysed. Take a new file back out so
                # that the peer's re-send counts as new again, and report failure so it re-sends.
                if stored.outcome == "new":
                    Path(stored.path).unlink(missing_ok=True)
                return self._refuse(record, STATUS_OUT_OF_RESOURCES, calling_ae, f"state database: {exc}",
                                    study_uid, sop_uid, logging.ERROR)
        if record is not None:
            record.count(study_uid, "duplicate" if stored.outcome == "duplicate" else "stored")
        log_event(log, logging.INFO, "instance_stored", calling_ae=calling_ae, study=study_uid, series=series_uid,
                  sop=sop_uid, transfer_syntax=transfer_syntax, bytes=stored.size, outcome=stored.outcome,
                  study_status=study_status, **({} if triggers else {"analysis": "not_triggered"}))
        if not triggers and self.seg_sink is not None and stored.outcome != "duplicate":
            # Checked later in the intake's own thread: the peer gets its status now.
            self.seg_sink(ReceivedSeg(Path(stored.path), study_uid, series_uid, sop_uid, calling_ae))
        return STATUS_SUCCESS
