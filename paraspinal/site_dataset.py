"""The site dataset: corrected segmentations kept as training cases, with a disk quota.

Layout under the site folder::

    cases/<case_id>/image.nii.gz     the source series, (I, J, K) float32, RAS affine
    cases/<case_id>/label.nii.gz     the correction, (I, J, K) uint8, model label numbering
    cases/<case_id>/provenance.json  hashed UIDs, time, calling AE, which result it corrects,
                                     which labels it annotates (``labelled_classes``)
    .patient_key                     random key for the keyed patient hash (never leaves the site)

(I, J, K) = (column, row, slice) of the source series, as :mod:`paraspinal.corrections`
reads it. The NIfTI files carry only the voxel grid and affine: no DICOM header, no name, no
ID. Provenance names studies and instances by hash only; patients by a keyed hash
(HMAC-SHA-256 with the site's own key: patient IDs are short and guessable, so an unkeyed
hash could be reversed by trying them) used only to hold out whole patients in the gate.

A case is written to a hidden staging folder and renamed into place, so a reader never sees
half a case. Adding a case that would take the dataset over its quota is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import nibabel as nib
import numpy as np

if TYPE_CHECKING:  # only for annotations: corrections imports nothing from here
    from paraspinal.corrections import Correction, SourceSeries

CASES_DIR = "cases"
PROVENANCE = "provenance.json"
KEY_FILE = ".patient_key"


class SiteDatasetError(ValueError):
    """The case cannot be added (quota, duplicate, unwritable)."""


@dataclass(frozen=True)
class SiteCase:
    """One stored case (paths and its provenance)."""

    case_id: str
    folder: Path
    provenance: dict[str, Any]

    @property
    def image_path(self) -> Path:
        return self.folder / "image.nii.gz"

    @property
    def label_path(self) -> Path:
        return self.folder / "label.nii.gz"

    @property
    def labelled_classes(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.provenance["labelled_classes"])

    @property
    def patient_key(self) -> str:
        return str(self.provenance.get("patient_key") or self.case_id)


def folder_size_mb(folder: Path) -> float:
    """Bytes of every file under ``folder``, in MiB."""
    total = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0
    return total / (1024 * 1024)


def patient_key(site_dir: Path, patient_id: str) -> str:
    """Keyed hash (16 hex) of a patient ID with the site's key, created on first use."""
    key_path = Path(site_dir) / KEY_FILE
    if not key_path.is_file():
        Path(site_dir).mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another writer made it first
            fd = None
        if fd is not None:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
            os.close(fd)
    key = key_path.read_bytes().strip()
    return hmac.new(key, patient_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


def add_case(site_dir: Path, case_id: str, image: np.ndarray, label: np.ndarray, affine_ras: np.ndarray,
             provenance: dict[str, Any], quota_mb: float) -> SiteCase:
    """Write one case atomically; refuse it when the dataset would exceed ``quota_mb`` (MiB).

    Args:
        image: (I, J, K) intensities on the source grid.
        label: (I, J, K) model labels on the same grid.
        affine_ras: 4x4 (I, J, K) -> RAS mm.
        provenance: JSON-able facts (hashed only; see the module doc); ``labelled_classes``
            is required.
    """
    if image.shape != label.shape:
        raise SiteDatasetError(f"image {image.shape} and label {label.shape} are on different grids")
    if "labelled_classes" not in provenance:
        raise SiteDatasetError("provenance must say which classes the case labels")
    cases = Path(site_dir) / CASES_DIR
    final = cases / case_id
    if final.exists():
        raise SiteDatasetError(f"case {case_id} is already in the site dataset")
    cases.mkdir(parents=True, exist_ok=True)
    staging = cases / f".incomplete-{case_id}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        nib.save(nib.Nifti1Image(np.asarray(image, dtype=np.float32), affine_ras), str(staging / "image.nii.gz"))
        nib.save(nib.Nifti1Image(np.asarray(label, dtype=np.uint8), affine_ras), str(staging / "label.nii.gz"))
        (staging / PROVENANCE).write_text(json.dumps({"case_id": case_id, **provenance}, indent=2) + "\n")
        used, adding = folder_size_mb(cases), folder_size_mb(staging)
        if used + adding > quota_mb:
            raise SiteDatasetError(f"site dataset quota: {used:.1f} MiB used + {adding:.1f} MiB for this case exceeds "
                                   f"{quota_mb:g} MiB (site_quota_mb)")
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SiteCase(case_id, final, json.loads((final / PROVENANCE).read_text()))


def list_cases(site_dir: Path) -> list[SiteCase]:
    """Every complete case, oldest first (by the time recorded in its provenance)."""
    cases = []
    root = Path(site_dir) / CASES_DIR
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / PROVENANCE).is_file():
            continue
        cases.append(SiteCase(folder.name, folder, json.loads((folder / PROVENANCE).read_text())))
    return sorted(cases, key=lambda c: (str(c.provenance.get("received_at", "")), c.case_id))


def add_correction(site_dir: Path, source: "SourceSeries", correction: "Correction", *, hash_uid: Callable[[str], str],
                   calling_ae: str, corrects: str | None, received_at: str, quota_mb: float,
                   model_version: str = "") -> SiteCase:
    """Store a checked correction (:func:`paraspinal.corrections.read_correction`) with its
    source series as a site case.

    Args:
        hash_uid: the node's UID hash (``app.node.logs.uid_hash``), so provenance names match
            the audit log's.
        calling_ae: who sent it (AE title; "offline" for ``training.site add``).
        corrects: hash of the node's SEG this correction replaces, or None when unknown.
        received_at: ISO 8601 UTC.
        model_version: the model version active when it was received.
    """
    provenance = {
        "study_hash": hash_uid(correction.study_uid),
        "series_hash": hash_uid(source.series_uid),
        "seg_hash": hash_uid(correction.sop_uid),
        "patient_key": patient_key(site_dir, source.patient_id or source.study_uid),
        "received_at": received_at,
        "calling_ae": calling_ae,
        "corrects": corrects,
        "model_version": model_version,
        "labelled_classes": list(correction.labelled_classes),
        "segments": [{"number": m.number, "label": m.label, "matched_by": m.matched_by}
                     for m in correction.segments],
        "voxels_per_label": {str(v): int((correction.label == v).sum()) for v in correction.labelled_classes if v},
        "shape": list(source.image.shape),
        "spacing_mm": [round(float(v), 4) for v in np.linalg.norm(source.affine_lps[:3, :3], axis=0)],
    }
    return add_case(site_dir, "c" + hash_uid(correction.sop_uid), source.image, correction.label, source.affine_ras,
                    provenance, quota_mb)
