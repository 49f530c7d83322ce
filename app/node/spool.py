"""The spool: every received instance on disk, durable before the peer hears "success".

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, each file
exactly the bytes received (preamble, file meta, data set as encoded by the sender).

Why each step of :func:`atomic_write` exists:

* the data go to a hidden temp file in the *same* directory (``rename`` is atomic only
  within one file system, and the pipeline's indexer skips dot-files, so a half-written
  file is never analysed);
* ``fsync`` of the file before the rename, so the name never points at unwritten blocks;
* ``rename`` publishes the whole file or nothing;
* ``fsync`` of the directory, so the new name itself survives a power cut.

UIDs are validated (digits and dots, at most 64 characters) before they become path
components: a UID like ``../../etc`` can never leave the spool.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


class InvalidUID(ValueError):
    """A UID that is not digits and dots of at most 64 characters."""


def validate_uid(uid: object, what: str = "UID") -> str:
    """Return ``uid`` as a string when it is a valid DICOM UID, else raise :class:`InvalidUID`.

    The whole text must match (``fullmatch``: a trailing newline, NUL or space is refused, not
    tolerated the way ``re.match(...$)`` would), so the result is always a safe path component.
    """
    text = "" if uid is None else str(uid)
    if not (0 < len(text) <= 64 and _UID.fullmatch(text)):
        raise InvalidUID(f"invalid {what}: {text[:80]!r}")
    return text


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new or renamed names) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create ``path`` and missing parents, fsyncing each parent that got a new entry."""
    path = Path(path)
    if path.is_dir():
        return
    ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return  # another association created it a moment ago
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file, or the whole new one."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish_dir(staging: Path, final: Path) -> None:
    """Put a completely written folder ``staging`` in place of ``final`` (same parent).

    Readers see the old folder or the new one, never a mixture: an existing ``final`` is
    renamed aside, ``staging`` renamed into place, then the old one deleted.
    """
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = final.parent / f".superseded-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)


@dataclass(frozen=True)
class StoredInstance:
    """What :meth:`Spool.store` did.

    Attributes:
        path: the instance's file.
        outcome: ``"new"`` (first time seen), ``"changed"`` (same SOP Instance UID, other
            bytes: replaced) or ``"duplicate"`` (identical bytes already there: not rewritten).
        size: bytes.
    """

    path: Path
    outcome: str
    size: int


class Spool:
    """Instances on disk under ``root``, one folder per study and series."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        ensure_dir(self.root)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def study_lock(self, study_uid: str) -> threading.Lock:
        """The lock that keeps storing-and-recording an instance of a study apart from removing
        that study (retention), within this process; one per study, so studies never wait for
        each other. Locks of forgotten studies are dropped by :meth:`drop_study_lock`."""
        with self._locks_guard:
            return self._locks.setdefault(study_uid, threading.Lock())

    def drop_study_lock(self, study_uid: str) -> None:
        with self._locks_guard:
            self._locks.pop(study_uid, None)

    def study_dir(self, study_uid: str) -> Path:
        return self.root / validate_uid(study_uid, "StudyInstanceUID")

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (self.study_dir(study_uid) / validate_uid(series_uid, "SeriesInstanceUID")
                / f"{validate_uid(sop_uid, 'SOPInstanceUID')}.dcm")

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredInstance:
        """Store one instance durably; a repeated SOP Instance UID is idempotent.

        Raises:
            InvalidUID: a UID is not usable as a path component (nothing is written).
            OSError: the disk refused (full, read-only); nothing half-written remains.
        """
        path = self.instance_path(study_uid, series_uid, sop_uid)
        if path.is_file():
            # Same bytes again (a PACS re-sending a study): nothing to write.
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                return StoredInstance(path, "duplicate", len(data))
            outcome = "changed"
        else:
            outcome = "new"
        ensure_dir(path.parent)
        atomic_write(path, data)
        return StoredInstance(path, outcome, len(data))

    def study_uids(self) -> list[str]:
        """Studies present on disk (folders whose name is a valid UID)."""
        found = []
        for entry in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if entry.is_dir():
                try:
                    found.append(validate_uid(entry.name))
                except InvalidUID:
                    continue
        return found

    def free_mb(self) -> float:
        """Free space on the spool's file system, MiB."""
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def remove_stale_temp_files(self, older_than_s: float = 0.0) -> int:
        """Delete the hidden temp files of writes that never finished (the node was killed
        between create and rename); returns how many. Only at start, when no write runs."""
        removed = 0
        now = time.time()
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    path = Path(dirpath) / name
                    try:
                        if now - path.stat().st_mtime >= older_than_s:
                            path.unlink()
                            removed += 1
                    except OSError:
                        continue
        return removed
