"""Retention: the node is a relay, not an archive, so finished studies are forgotten.

A study finished (done or failed) more than ``retention_days`` ago, with nothing counted
arriving since and no result pending or dead, is removed: its spooled images, its failed-study
folder, its rows in the state database and -- only when destinations are configured, because
then the results live in the PACS -- its results folder. A dead letter keeps its study (and the
files it would send) until an operator acts. ``retention_days: 0`` keeps everything.

Under the study's spool lock (the listener stores and records each instance under it), the rows
are deleted first, if the study is still as found (an instance that arrived since cancels the
purge), then the study's folders are renamed to ``.purge-*`` names (never published, never
adopted as a study) and deleted after the lock is released. A crash between the two steps leaves
a spool folder without rows, which the next start adopts as a new study: analysed once more and
its results re-sent under the same UIDs (idempotent), never lost. Leftover ``.purge-*`` folders
are removed at the next sweep.

Refused corrections (``learning.refused_dir``, SEGs kept as received, patient headers included)
follow the same ``retention_days``, counted from their refusal (:func:`purge_refused_corrections`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from app.config import NodeSettings
from app.node.audit import AuditLog
from app.node.logs import log_event, uid_hash
from app.node.spool import Spool
from app.node.state import StateStore

log = logging.getLogger(__name__)

PURGE_PREFIX = ".purge-"
DAY_S = 86400.0


def _set_aside(folder: Path) -> Path | None:
    """Rename ``folder`` beside itself to a ``.purge-*`` name; None when it does not exist."""
    if not folder.is_dir():
        return None
    target = folder.with_name(f"{PURGE_PREFIX}{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(folder, target)
    return target


def _remove_leftovers(roots: list[Path]) -> int:
    removed = 0
    for root in roots:
        for entry in root.glob(f"{PURGE_PREFIX}*") if root.is_dir() else []:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def purge_expired(settings: NodeSettings, state: StateStore, spool: Spool, audit: AuditLog | None = None,
                  now: float | None = None) -> list[str]:
    """Forget every study past retention (see the module doc); returns their Study Instance UIDs."""
    roots = [Path(spool.root), Path(settings.results_dir), Path(settings.failed_dir)]
    _remove_leftovers(roots)
    if settings.retention_days <= 0:
        return []
    now = time.time() if now is None else now
    keep_results = not settings.destinations
    purged = []
    for study in state.expired_studies(now - settings.retention_days * DAY_S):
        uid = study["study_uid"]
        folders = [spool.study_dir(uid)]
        if study.get("failed_path"):
            folders.append(Path(study["failed_path"]))
        if study.get("results_path") and not keep_results:
            folders.append(Path(study["results_path"]))
        with spool.study_lock(uid):  # no instance of this study is being stored meanwhile
            if not state.forget_study(study):
                log_event(log, logging.INFO, "purge_cancelled", study=uid, reason="new instance(s) arrived")
                continue
            aside = []
            for folder in folders:
                try:
                    moved = _set_aside(folder)
                except OSError as exc:  # left in place; a restart adopts a spool folder as a new study
                    log_event(log, logging.WARNING, "purge_incomplete", study=uid, folder=folder.name,
                              error=f"{type(exc).__name__}: {exc}")
                    continue
                if moved is not None:
                    aside.append(moved)
        spool.drop_study_lock(uid)
        purged.append(uid)
        log_event(log, logging.INFO, "study_purged", study=uid, status=study["status"],
                  finished_days_ago=round((now - study["finished_at"]) / DAY_S, 1), results_kept=keep_results)
        if audit is not None:
            audit.write("study_purged", study=uid_hash(uid), status=study["status"],
                        retention_days=settings.retention_days, results_kept=keep_results)
        for folder in aside:
            shutil.rmtree(folder, ignore_errors=True)
    return purged


def purge_refused_corrections(refused_dir: Path, retention_days: float, audit: AuditLog | None = None,
                              now: float | None = None) -> list[str]:
    """Remove refused corrections (``<refused_dir>/<seg hash>/``) refused more than
    ``retention_days`` ago (the folder's modification time: it is written once, at refusal);
    returns the removed folders' names (SEG hashes). ``retention_days <= 0`` keeps everything."""
    root = Path(refused_dir)
    if retention_days <= 0 or not root.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(PURGE_PREFIX)):
        if now - folder.stat().st_mtime <= retention_days * DAY_S:
            continue
        aside = _set_aside(folder)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
            removed.append(folder.name)
            log_event(log, logging.INFO, "refused_correction_purged", seg=folder.name)
            if audit is not None:
                audit.write("refused_correction_purged", seg=folder.name, retention_days=retention_days)
    return removed
