"""Site training data stored as DICOM: an MR series plus a DICOM SEG of it.

Layout under ``--data-dir`` (next to any NIfTI pairs)::

    <case>/image/*.dcm      one axial MR series (one stack)
    <case>/seg.dcm          DICOM Segmentation (BINARY) referencing that series

Geometry: slices are ordered along the slice normal (row x column direction cosines);
the (col, row, slice) voxel -> LPS affine is built from ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, then converted to RAS for the shared
preprocessing (as the application does for DICOM input).

Segment -> bundle label: ``label_map`` (segment number -> bundle label) when given, else
from each segment's label text, e.g. "multifidus right", "Erector spinae L" (muscle name
and side must both be recognised, otherwise loading fails rather than guessing).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from paraspinal.preprocessing import lps_affine_to_ras
from training.data import CaseError, LoadedCase, remap_labels
from training.labels import ALL_CLASSES

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_MUSCLES = {"multifidus": (1, 2), "erector spinae": (3, 4), "psoas": (5, 6), "quadratus lumborum": (7, 8)}


def label_from_text(text: str) -> int | None:
    """Bundle label from a segment label like "Multifidus right" / "erector_spinae_L"; None if unclear."""
    norm = re.sub(r"[^a-z]+", " ", text.lower()).strip()
    muscle = next((labels for name, labels in _MUSCLES.items() if name in norm), None)
    words = set(norm.split())
    right = bool(words & {"right", "r", "dexter", "dx"})
    left = bool(words & {"left", "l", "sinister", "sin"})
    if muscle is None or right == left:
        return None
    return muscle[0] if right else muscle[1]


def read_series(series_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(I, J, K) float32 volume, RAS affine and SOP Instance UIDs in slice order."""
    datasets = []
    for path in sorted(p for p in Path(series_dir).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path))
        except pydicom.errors.InvalidDicomError:
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            datasets.append(ds)
    if not datasets:
        raise CaseError(f"{series_dir}: no DICOM images with geometry")
    if len({ds.SeriesInstanceUID for ds in datasets}) != 1:
        raise CaseError(f"{series_dir}: more than one series")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)))
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    steps = np.diff(positions, axis=0)
    step = steps.mean(axis=0) if len(steps) else normal * float(datasets[0].get("SliceThickness", 1.0))
    if len(steps) and not np.allclose(steps, step, atol=1e-2):
        raise CaseError(f"{series_dir}: slices are not evenly spaced (several stacks?)")
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing  # voxel axis i = column index, along the row direction
    affine_lps[:3, 1] = col_dir * row_spacing  # voxel axis j = row index
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    pixels = np.stack([apply_modality_lut(ds.pixel_array, ds).astype(np.float32) for ds in datasets])
    return pixels.transpose(2, 1, 0).copy(), lps_affine_to_ras(affine_lps), [ds.SOPInstanceUID for ds in datasets]


def dicom_seg_case(case_id: str, series_dir: Path, seg_path: Path, label_map: Mapping[int, int] | None = None,
                   labelled_classes: Sequence[int] = ALL_CLASSES) -> LoadedCase:
    """A labelled case from an MR series and its DICOM SEG."""
    image, affine, uids = read_series(series_dir)
    seg = hd.seg.segread(str(seg_path))
    if seg.SOPClassUID != SEG_SOP_CLASS:
        raise CaseError(f"{seg_path}: not a DICOM Segmentation")
    numbers = list(seg.segment_numbers)
    if label_map is None:
        label_map = {}
        for number in numbers:
            text = str(seg.get_segment_description(number).segment_label)
            value = label_from_text(text)
            if value is None:
                raise CaseError(f"{seg_path}: segment {number} {text!r} does not name a muscle and side; "
                                "give a label_map in dataset.json")
            label_map[number] = value
    # (slices, rows, cols) segment numbers in the series' slice order; slices the SEG
    # does not cover are empty.
    numbers_map = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, combine_segments=True,
                                                    relabel=False, assert_missing_frames_are_empty=True)
    label = remap_labels(np.asarray(numbers_map), label_map, str(seg_path)).transpose(2, 1, 0).copy()
    return LoadedCase(case_id, image, label, affine, tuple(sorted({0, *labelled_classes})),
                      f"site DICOM {Path(series_dir).name} + SEG {Path(seg_path).name}")
