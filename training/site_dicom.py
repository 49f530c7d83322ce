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

from paraspinal.corrections import CorrectionRefused, read_source_series
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
    """(I, J, K) float32 volume, RAS affine and SOP Instance UIDs in slice order (the node's own
    reader of a correction's source series, :func:`paraspinal.corrections.read_source_series`)."""
    try:
        source = read_source_series([p for p in Path(series_dir).rglob("*") if p.is_file()])
    except CorrectionRefused as exc:
        raise CaseError(f"{series_dir}: {exc}") from exc
    return source.image, lps_affine_to_ras(source.affine_lps), list(source.sop_uids)


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
