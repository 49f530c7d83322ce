"""Model versions: the shipped bundle plus the site's fine-tuned ones, and which one is active.

Layout of the site model folder (``learning.models_dir``)::

    <name>-<version>/            a bundle (configs/metadata.json, models/model.ts, docs/README.md);
                                 metadata["site_finetune"] holds its data counts, the gate's
                                 comparison table and decision
    active.json                  {"version": ..., "path": ..., "history": [...], "changed_at": ...}

The shipped bundle (``models/``) is never written. Without ``active.json`` the shipped bundle
is active. ``active.json`` is replaced atomically (write a temporary file, fsync, rename), so a
reader sees the old pointer or the new one, never half of one. ``history`` lists the versions
that were active before, newest last, for rollback. Earlier versions are never deleted.

Readers (the node's dispatcher, before each study) call :meth:`ModelRegistry.active_path`,
which re-reads the pointer only when its modification time changed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paraspinal.model_bundle import METADATA_RELPATH, BundleError, find_bundle, read_metadata

POINTER = "active.json"


class RegistryError(ValueError):
    """A version is unknown, or a switch is not allowed (e.g. promoting a refused candidate)."""


@dataclass(frozen=True)
class ModelVersion:
    """One version: where it lies, whether it is the shipped one, and its gate result."""

    version: str
    path: Path
    shipped: bool
    gate: dict[str, Any] | None  # {"decision": "promote"|"refuse", "reasons": [...], ...}; None for shipped

    @property
    def gate_passed(self) -> bool:
        return self.shipped or bool(self.gate and self.gate.get("decision") == "promote")


class ModelRegistry:
    """The versions under ``models_dir`` plus the shipped bundle at ``shipped``.

    Args:
        shipped: the shipped bundle (or a folder holding exactly one).
        models_dir: the site model folder (created on first write).
    """

    def __init__(self, shipped: Path, models_dir: Path) -> None:
        self.shipped = find_bundle(Path(shipped))
        self.models_dir = Path(models_dir)
        self._lock = threading.Lock()
        self._seen: tuple[float, Path] | None = None  # (pointer mtime, resolved path)

    # ---- reading ----------------------------------------------------------------------------

    def _version_of(self, path: Path, shipped: bool) -> ModelVersion:
        metadata = read_metadata(path)
        gate = None if shipped else (metadata.get("site_finetune") or {}).get("gate")
        return ModelVersion(str(metadata.get("version", "0")), path, shipped, gate)

    def versions(self) -> list[ModelVersion]:
        """The shipped version first, then the site versions by creation time."""
        out = [self._version_of(self.shipped, True)]
        if self.models_dir.is_dir():
            folders = [p for p in self.models_dir.iterdir() if (p / METADATA_RELPATH).is_file()]
            for folder in sorted(folders, key=lambda p: (p / METADATA_RELPATH).stat().st_mtime):
                out.append(self._version_of(folder, False))
        return out

    def find(self, version: str) -> ModelVersion:
        for candidate in self.versions():
            if candidate.version == version:
                return candidate
        raise RegistryError(f"no model version {version!r} (known: {', '.join(v.version for v in self.versions())})")

    def pointer(self) -> dict[str, Any]:
        """The active pointer's content; empty when the shipped bundle is active by default."""
        path = self.models_dir / POINTER
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path}: unreadable ({exc})") from exc

    def active(self) -> ModelVersion:
        """The active version (the shipped one when no pointer exists)."""
        pointer = self.pointer()
        if not pointer:
            return self._version_of(self.shipped, True)
        path = Path(pointer["path"])
        path = path if path.is_absolute() else self.models_dir / path
        return self._version_of(path, path.resolve() == self.shipped.resolve())

    def active_path(self) -> Path:
        """The active bundle's folder; a stat per call, the pointer re-read only when it changed.

        A pointer to a bundle that does not load keeps the previously resolved one (and the
        shipped one when nothing was resolved yet): a broken switch must not stop analyses."""
        pointer = self.models_dir / POINTER
        try:
            mtime = pointer.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = -1
        with self._lock:
            if self._seen is not None and self._seen[0] == mtime:
                return self._seen[1]
            try:
                path = self.active().path if mtime != -1 else self.shipped
                find_bundle(path)
            except (BundleError, RegistryError, KeyError, OSError):
                path = self._seen[1] if self._seen is not None else self.shipped
            self._seen = (mtime, path)
            return path

    # ---- switching ----------------------------------------------------------------------------

    def _write_pointer(self, target: ModelVersion, history: list[str], why: str) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        content = {"version": target.version,
                   "path": str(target.path if target.shipped else target.path.resolve().relative_to(
                       self.models_dir.resolve())),
                   "shipped": target.shipped, "history": history, "changed_at": time.time(), "why": why}
        temp = self.models_dir / f".{POINTER}.{os.getpid()}.tmp"
        with open(temp, "w") as handle:
            handle.write(json.dumps(content, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.models_dir / POINTER)
        fd = os.open(self.models_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def promote(self, version: str, force: bool = False, why: str = "promote") -> tuple[str, str]:
        """Make ``version`` active; returns (previous version, new version).

        A site version whose gate refused it is promoted only with ``force`` (an operator's
        decision, which the caller audits as such)."""
        target = self.find(version)
        if not target.gate_passed and not force:
            raise RegistryError(f"version {version} did not pass the gate ({', '.join((target.gate or {}).get('reasons', [])) or 'no gate result'}); "
                                "use --force to promote it anyway")
        current = self.active()
        if current.version == target.version:
            raise RegistryError(f"version {version} is already active")
        history = [*self.pointer().get("history", []), current.version]
        self._write_pointer(target, history, why)
        return current.version, target.version

    def rollback(self) -> tuple[str, str]:
        """Return to the version active before the current one (the shipped one when none);
        returns (version left, version now active)."""
        current = self.active()
        history = list(self.pointer().get("history", []))
        while history:
            previous = history.pop()
            if previous == current.version:
                continue
            try:
                target = self.find(previous)
            except RegistryError:
                continue  # a version folder removed by hand: skip it
            self._write_pointer(target, history, "rollback")
            return current.version, target.version
        if current.shipped:
            raise RegistryError("nothing to roll back to: the shipped version is active")
        self._write_pointer(self._version_of(self.shipped, True), [], "rollback")
        return current.version, self.active().version

    def next_version(self, base: str) -> str:
        """A new site version derived from ``base``: ``<base>+site.<n>`` (PEP 440 local part),
        ``n`` one more than any site version of that base."""
        root = base.split("+site.")[0]
        taken = [v.version for v in self.versions() if v.version.startswith(f"{root}+site.")]
        numbers = [int(t.rsplit(".", 1)[1]) for t in taken if t.rsplit(".", 1)[1].isdigit()]
        return f"{root}+site.{max(numbers, default=0) + 1}"
