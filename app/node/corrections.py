"""Corrections received by C-STORE: a reader's edited muscle SEG becomes a site training case.

The listener hands every spooled SEG that is not a lumbar level source to
:meth:`CorrectionIntake.submit`; one background thread (never the association's: the peer
already has its 0x0000) then decides:

* the node's own SEG routed back (its SOP Instance UID is in the outbox): ignored, logged;
* a SEG on a series the node did not analyse (unknown study, or not the series in the
  study's ``result.json``): refused;
* otherwise the SEG is read against that series from the spool
  (:func:`paraspinal.corrections.read_correction`) and stored as a case
  (:func:`paraspinal.site_dataset.add_correction`), or refused with the reason.

Each outcome is one log line and one audit entry (``correction_accepted``,
``correction_refused``, ``correction_ignored``) naming studies and instances by hash only.
A refused SEG is copied to ``learning.refused_dir/<seg hash>/`` with ``reason.json``; it is
never trained on.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pydicom

from app.config import LearningSettings
from app.node.audit import AuditLog, utc_iso
from app.node.logs import log_event, uid_hash
from app.node.spool import Spool, atomic_write, ensure_dir
from app.node.state import StateStore
from paraspinal.corrections import (
    SEG_SOP_CLASS,
    CorrectionRefused,
    read_correction,
    read_source_series,
    referenced_series_uid,
)
from paraspinal.model_bundle import find_bundle, parse_labels, read_metadata
from paraspinal.model_registry import ModelRegistry
from paraspinal.site_dataset import SiteDatasetError, add_correction, list_cases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedSeg:
    """A SEG the listener spooled: where, and from whom."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    calling_ae: str


class CorrectionIntake:
    """Turns received SEGs into site cases, one at a time in its own thread.

    Args:
        learning: the ``learning`` settings (site folder, quota, refused folder).
        state: the node's state (outbox: which SEGs are its own; studies: results folders).
        spool: where the source series lies.
        audit: the audit trail.
        registry: the model versions; the active one's label table maps segments.
    """

    def __init__(self, learning: LearningSettings, state: StateStore, spool: Spool, audit: AuditLog,
                 registry: ModelRegistry) -> None:
        self.learning = learning
        self.state = state
        self.spool = spool
        self.audit = audit
        self.registry = registry
        self._queue: queue.Queue[ReceivedSeg | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="node-corrections", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the SEGs already handed over, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    def submit(self, seg: ReceivedSeg) -> None:
        """Hand over a spooled SEG (cheap; called from the listener's association thread)."""
        self._queue.put(seg)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.consider(item)
            except Exception as exc:  # one SEG must not end the intake
                log.exception("correction intake error")
                self._refuse(item, f"internal error: {type(exc).__name__}")

    def consider(self, item: ReceivedSeg) -> str:
        """Decide about one SEG; returns ``accepted``, ``refused`` or ``ignored``."""
        if self.state.is_node_output(item.sop_uid):
            log_event(log, logging.INFO, "correction_ignored", study=item.study_uid, sop=item.sop_uid,
                      reason="the node's own SEG routed back")
            self.audit.write("correction_ignored", study=uid_hash(item.study_uid), sop=uid_hash(item.sop_uid),
                             calling_ae=item.calling_ae, reason="the node's own SEG routed back")
            return "ignored"
        try:
            seg = pydicom.dcmread(str(item.path))
            source_uid = referenced_series_uid(seg)
            analysed = self._analysed_series(item.study_uid)
            if source_uid is None or source_uid not in analysed:
                raise CorrectionRefused("the SEG does not reference a series the node analysed")
            paths = [self.spool.instance_path(item.study_uid, source_uid, uid)
                     for uid in self.state.series_instances(item.study_uid, source_uid)]
            source = read_source_series([p for p in paths if p.is_file()])
            # The label table and version only: the weights are the workers' business.
            metadata = read_metadata(find_bundle(self.registry.active_path()))
            correction = read_correction(seg, source, parse_labels(metadata))
            own = self.state.node_outputs(item.study_uid, SEG_SOP_CLASS)
            case = add_correction(self.learning.site_dir, source, correction, hash_uid=uid_hash,
                                  calling_ae=item.calling_ae, corrects=uid_hash(own[-1]) if own else None,
                                  received_at=utc_iso(), quota_mb=self.learning.site_quota_mb,
                                  model_version=str(metadata.get("version", "")))
        except (CorrectionRefused, SiteDatasetError) as exc:
            self._refuse(item, str(exc))
            return "refused"
        for note in correction.fallbacks:
            log_event(log, logging.WARNING, "correction_label_fallback", study=item.study_uid, sop=item.sop_uid,
                      note=note)
        labels = list(case.labelled_classes)[1:]
        log_event(log, logging.INFO, "correction_accepted", study=item.study_uid, sop=item.sop_uid,
                  case=case.case_id, labels=",".join(map(str, labels)), calling_ae=item.calling_ae,
                  site_cases=len(list_cases(self.learning.site_dir)))
        self.audit.write("correction_accepted", study=uid_hash(item.study_uid), sop=uid_hash(item.sop_uid),
                         calling_ae=item.calling_ae, case=case.case_id, labels=labels,
                         corrects=case.provenance.get("corrects"),
                         label_text_fallbacks=len(correction.fallbacks))
        return "accepted"

    def _analysed_series(self, study_uid: str) -> set[str]:
        """Series the node analysed in a study: the chosen series of its current result.json."""
        study = self.state.study(study_uid)
        if not study or not study.get("results_path"):
            return set()
        result_json = Path(study["results_path"]) / "result.json"
        try:
            result = json.loads(result_json.read_text())
        except (OSError, json.JSONDecodeError):
            return set()
        chosen = result.get("chosen_series") or {}
        uid = chosen.get("series_instance_uid") or chosen.get("series_uid")
        return {str(uid)} if uid else set()

    def _refuse(self, item: ReceivedSeg, reason: str) -> None:
        log_event(log, logging.WARNING, "correction_refused", study=item.study_uid, sop=item.sop_uid,
                  calling_ae=item.calling_ae, reason=reason)
        self.audit.write("correction_refused", study=uid_hash(item.study_uid), sop=uid_hash(item.sop_uid),
                         calling_ae=item.calling_ae, reason=reason)
        aside = Path(self.learning.refused_dir) / uid_hash(item.sop_uid)
        try:
            ensure_dir(aside)
            shutil.copy2(item.path, aside / "seg.dcm")
            atomic_write(aside / "reason.json", json.dumps({
                "study_hash": uid_hash(item.study_uid), "seg_hash": uid_hash(item.sop_uid),
                "calling_ae": item.calling_ae, "refused_at": utc_iso(), "reason": reason}, indent=2).encode())
        except OSError as exc:
            log_event(log, logging.ERROR, "correction_keep_aside_error", sop=item.sop_uid, error=str(exc))
