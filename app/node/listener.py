"""The listener: a pynetdicom Storage SCP (MR, Enhanced MR) and Verification SCP.

Each handler does one thing and returns a status:

* ``EVT_REQUESTED``: a calling peer not in ``allowed_peers`` (AE title, and host when given)
  gets an A-ASSOCIATE-RJ (rejected-permanent, service-user, calling AE title not recognised);
* ``EVT_C_ECHO``: success;
* ``EVT_C_STORE``: validate the UIDs, write the bytes exactly as received to the spool
  (durably), record the arrival in the state database, and only then answer 0x0000.

Failure statuses (PS3.4 Annex B.2.3): 0xA700 out of resources (spool disk below
``min_free_disk_mb`` or the write failed), 0xC000 cannot understand (a Study, Series or SOP
Instance UID missing, malformed or not matching the request).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sqlite3

from pydicom.uid import (
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
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from app.config import AllowedPeer, NodeSettings
from app.node.logs import log_event
from app.node.spool import InvalidUID, Spool, validate_uid
from app.node.state import InstanceArrival, StateStore

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = (MRImageStorage, EnhancedMRImageStorage)

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
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


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


class PeerPolicy:
    """Who may associate: empty ``allowed`` means anyone."""

    def __init__(self, allowed: tuple[AllowedPeer, ...]) -> None:
        self._rules = [(p.ae_title.strip(), _addresses(p.host) if p.host else None) for p in allowed]

    def allows(self, calling_ae: str, address: str) -> bool:
        if not self._rules:
            return True
        calling_ae = calling_ae.strip()
        return any(ae == calling_ae and (hosts is None or address in hosts) for ae, hosts in self._rules)


class Listener:
    """The node's DICOM server.

    Args:
        settings: the ``node`` configuration section (AE title, address, port, peers, timeouts).
        spool: where instances are written.
        state: where arrivals are recorded.
    """

    def __init__(self, settings: NodeSettings, spool: Spool, state: StateStore) -> None:
        self.settings = settings
        self.spool = spool
        self.state = state
        self.policy = PeerPolicy(settings.allowed_peers)
        self.ae = self._build_ae()
        self._server: ThreadedAssociationServer | None = None

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        ae.maximum_associations = s.max_associations
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
        handlers = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_closed),
        ]
        self._server = self.ae.start_server((self.settings.bind_address, self.settings.port), block=False,
                                            evt_handlers=handlers)
        log_event(log, logging.INFO, "listener_started", ae_title=self.settings.ae_title,
                  address=self.settings.bind_address, port=self.port,
                  allowed_peers=len(self.settings.allowed_peers) or "any",
                  max_associations=self.settings.max_associations)

    def stop(self) -> None:
        """Stop accepting, and close the server (running associations are aborted)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log_event(log, logging.INFO, "listener_stopped")

    # ---- handlers --------------------------------------------------------------------------

    def handle_requested(self, event: Event) -> None:
        """Reject a calling peer that is not allowed, before any negotiation."""
        assoc = event.assoc
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = assoc.requestor.address
        if self.policy.allows(calling_ae, address):
            return
        log_event(log, logging.WARNING, "association_rejected", calling_ae=calling_ae, peer=address,
                  reason="calling peer not in allowed_peers")
        # rejected-permanent, DUL service-user, calling AE title not recognised
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()

    def handle_accepted(self, event: Event) -> None:
        assoc = event.assoc
        log_event(log, logging.INFO, "association_accepted", calling_ae=str(assoc.requestor.ae_title).strip(),
                  peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
                  contexts=len(assoc.accepted_contexts))

    def handle_closed(self, event: Event) -> None:
        assoc = event.assoc
        log_event(log, logging.INFO, "association_" + ("aborted" if event.event is evt.EVT_ABORTED else "released"),
                  calling_ae=str(assoc.requestor.ae_title).strip(),
                  peer=f"{assoc.requestor.address}:{assoc.requestor.port}")

    def handle_echo(self, event: Event) -> int:
        log_event(log, logging.INFO, "echo", calling_ae=str(event.assoc.requestor.ae_title).strip())
        return STATUS_SUCCESS

    def handle_store(self, event: Event) -> int:
        """Spool one instance durably and record it; the status goes back only after both."""
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        request = event.request
        sop_uid_rq = str(request.AffectedSOPInstanceUID or "")
        try:
            dataset = event.dataset
            study_uid = validate_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID")
            series_uid = validate_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop_uid = validate_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
            if sop_uid != sop_uid_rq:
                raise InvalidUID(f"SOPInstanceUID {sop_uid} differs from the request's {sop_uid_rq[:80]!r}")
        except InvalidUID as exc:
            log_event(log, logging.WARNING, "store_refused", status="0xC000", calling_ae=calling_ae,
                      reason=str(exc))
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # a data set pydicom cannot parse
            log_event(log, logging.WARNING, "store_refused", status="0xC000", calling_ae=calling_ae,
                      reason=f"unreadable data set: {type(exc).__name__}")
            return STATUS_CANNOT_UNDERSTAND

        free_mb = self.spool.free_mb()
        if free_mb < self.settings.min_free_disk_mb:
            log_event(log, logging.ERROR, "store_refused", status="0xA700", calling_ae=calling_ae,
                      study=study_uid, sop=sop_uid, reason="spool disk low", free_mb=round(free_mb),
                      min_free_mb=self.settings.min_free_disk_mb)
            return STATUS_OUT_OF_RESOURCES
        try:
            # The bytes as received: preamble, file meta from the negotiated context, data set
            # exactly as the peer encoded it (no decode/re-encode, so nothing can change).
            stored = self.spool.store(study_uid, series_uid, sop_uid, event.encoded_dataset())
        except OSError as exc:
            log_event(log, logging.ERROR, "store_refused", status="0xA700", calling_ae=calling_ae,
                      study=study_uid, sop=sop_uid, reason=f"{type(exc).__name__}: {exc.strerror or exc}")
            return STATUS_OUT_OF_RESOURCES
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            study_status = self.state.record_instance(InstanceArrival(
                study_uid=study_uid, series_uid=series_uid, sop_instance_uid=sop_uid,
                sop_class_uid=str(request.AffectedSOPClassUID), transfer_syntax=transfer_syntax,
                size=stored.size, outcome=stored.outcome, calling_ae=calling_ae))
        except sqlite3.Error as exc:
            # Unrecorded, the instance would never be analysed. Take a new file back out so
            # that the peer's re-send counts as new again, and report failure so it re-sends.
            if stored.outcome == "new":
                stored.path.unlink(missing_ok=True)
            log_event(log, logging.ERROR, "store_refused", status="0xA700", calling_ae=calling_ae,
                      study=study_uid, sop=sop_uid, reason=f"state database: {exc}")
            return STATUS_OUT_OF_RESOURCES
        log_event(log, logging.INFO, "instance_stored", calling_ae=calling_ae, study=study_uid, series=series_uid,
                  sop=sop_uid, transfer_syntax=transfer_syntax, bytes=stored.size, outcome=stored.outcome,
                  study_status=study_status)
        return STATUS_SUCCESS
