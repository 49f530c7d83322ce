"""A reader's corrected muscle segmentation (DICOM SEG) read against the MR series it segments.

A site corrects the node's SEG in a viewer (3D Slicer, OHIF) and sends the edited SEG back.
This module turns such a SEG plus its source series into a label volume on the source grid,
in the model's label numbering, or refuses it with a reason (:class:`CorrectionRefused`).

Coordinates: the source volume is indexed (I, J, K) = (column, row, slice), slices ordered
along the slice normal (row x column direction cosines); ``affine_lps`` maps (I, J, K) to LPS
patient mm, ``affine_ras`` to RAS (NIfTI). A SEG frame (rows, cols) lands on slice K as
``frame.T`` -> (I, J).

Segment -> model label: the segment's property type code (scheme + value, e.g. SCT 44947003
erector spinae) together with its laterality (the property type modifier, SCT 24028007 right /
SCT 7771000 left, as this node writes it and as Slicer/dcmqi keep it). Only when the codes do
not decide is the segment label text used ("Multifidus left"), and that fallback is reported
so the caller can log it. An unknown segment, a segment with no voxel on the series, another
frame of reference, or frames that do not lie on the series' slices refuse the whole SEG: a
half-understood correction is never trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from paraspinal.model_bundle import LabelInfo

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: A SEG frame must lie within this distance of a series slice (mm), and its in-plane spacing
#: and direction cosines must agree within these tolerances.
POSITION_TOLERANCE_MM = 0.1
SPACING_TOLERANCE_MM = 1e-3
ORIENTATION_TOLERANCE = 1e-3

_MUSCLE_WORDS = {"multifidus": "multifidus", "erector spinae": "erector spinae", "psoas": "psoas major",
                 "quadratus lumborum": "quadratus lumborum"}


class CorrectionRefused(ValueError):
    """A SEG that cannot be used as a correction; ``reason`` says why (no patient data in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SourceSeries:
    """One single-stack MR series on its voxel grid.

    Attributes:
        image: (I, J, K) float32 stored values after the modality LUT.
        affine_lps: 4x4 (I, J, K) -> LPS patient mm.
        sop_uids: SOP Instance UIDs in K order.
        positions_lps: (K, 3) ImagePositionPatient of each slice, mm.
        orientation: the six direction cosines (row direction, column direction).
        pixel_spacing: (row spacing, column spacing), mm, as PixelSpacing.
        series_uid, study_uid, frame_of_reference_uid: the series' UIDs.
        patient_id: PatientID as stored (only ever hashed by callers).
    """

    image: np.ndarray
    affine_lps: np.ndarray
    sop_uids: tuple[str, ...]
    positions_lps: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    patient_id: str

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 (I, J, K) -> RAS mm (NIfTI convention): x and y negated, as
        :func:`paraspinal.preprocessing.lps_affine_to_ras` does (not imported: it pulls in MONAI,
        which the node's listener process has no other use for)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps


@dataclass(frozen=True)
class SegmentMatch:
    """How one segment of the correction was understood."""

    number: int
    label: int
    matched_by: str  # "code" | "label text"
    text: str


@dataclass(frozen=True)
class Correction:
    """A usable correction: labels on the source grid and what they cover.

    Attributes:
        label: (I, J, K) uint8 on the source grid, model label numbering, 0 elsewhere.
        labelled_classes: classes the correction annotates, background 0 included; any class
            not listed is unknown in this case, not background (partial labels).
        segments: one entry per segment.
        series_uid: the source series the SEG references.
        sop_uid, study_uid: the SEG's UIDs.
    """

    label: np.ndarray
    labelled_classes: tuple[int, ...]
    segments: tuple[SegmentMatch, ...]
    series_uid: str
    sop_uid: str
    study_uid: str
    fallbacks: tuple[str, ...] = field(default=())


def read_source_series(paths: Sequence[Path]) -> SourceSeries:
    """The MR series in ``paths`` (files of exactly one series, one stack) as a volume.

    Raises:
        CorrectionRefused: no image, several series, or unevenly spaced slices.
    """
    datasets = []
    for path in sorted(Path(p) for p in paths):
        try:
            ds = pydicom.dcmread(str(path))
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            datasets.append(ds)
    if not datasets:
        raise CorrectionRefused("the source series has no images with geometry")
    if len({ds.SeriesInstanceUID for ds in datasets}) != 1:
        raise CorrectionRefused("the source folder holds more than one series")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)))
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    steps = np.diff(positions, axis=0)
    step = steps.mean(axis=0) if len(steps) else normal * float(datasets[0].get("SliceThickness", 1.0))
    if len(steps) and not np.allclose(steps, step, atol=1e-2):
        raise CorrectionRefused("the source series is not one evenly spaced stack")
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * col_spacing  # I = column index, along the row direction
    affine[:3, 1] = iop[3:] * row_spacing  # J = row index, along the column direction
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    pixels = np.stack([apply_modality_lut(ds.pixel_array, ds).astype(np.float32) for ds in datasets])
    first = datasets[0]
    return SourceSeries(
        image=pixels.transpose(2, 1, 0).copy(), affine_lps=affine,
        sop_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets), positions_lps=positions, orientation=iop,
        pixel_spacing=(row_spacing, col_spacing), series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.StudyInstanceUID), frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        patient_id=str(first.get("PatientID", "")))


def referenced_series_uid(seg: Dataset) -> str | None:
    """The series a SEG segments (its first Referenced Series), or None."""
    for item in seg.get("ReferencedSeriesSequence", []) or []:
        uid = str(item.get("SeriesInstanceUID", ""))
        if uid:
            return uid
    return None


def _code(item: Dataset) -> tuple[str, str]:
    return str(item.get("CodingSchemeDesignator", "")).upper(), str(item.get("CodeValue", ""))


def _laterality(segment: Dataset) -> set[tuple[str, str]]:
    """Laterality codes of a segment: the property type modifiers (PS3.3 C.8.20.2), and the
    anatomic region modifiers some writers use instead."""
    found: set[tuple[str, str]] = set()
    for prop in segment.get("SegmentedPropertyTypeCodeSequence", []) or []:
        found |= {_code(m) for m in prop.get("SegmentedPropertyTypeModifierCodeSequence", []) or []}
    for region in segment.get("AnatomicRegionSequence", []) or []:
        found |= {_code(m) for m in region.get("AnatomicRegionModifierSequence", []) or []}
    return found


def label_from_text(text: str, labels: Sequence[LabelInfo]) -> int | None:
    """Model label named by a segment label like "Multifidus right" / "erector_spinae_L"; None if unclear."""
    norm = re.sub(r"[^a-z]+", " ", text.lower()).strip()
    muscle = next((name for word, name in _MUSCLE_WORDS.items() if word in norm), None)
    words = set(norm.split())
    right = bool(words & {"right", "r", "rt", "dexter", "dx"})
    left = bool(words & {"left", "l", "lt", "sinister", "sin"})
    if muscle is None or right == left:
        return None
    side = "right" if right else "left"
    return next((info.value for info in labels if info.muscle == muscle and info.side == side), None)


def match_segment(segment: Dataset, labels: Sequence[LabelInfo]) -> SegmentMatch | None:
    """The model label of one SegmentSequence item: by code and laterality, else by label text."""
    number = int(segment.get("SegmentNumber", 0))
    text = str(segment.get("SegmentLabel", ""))
    types = {_code(item) for item in segment.get("SegmentedPropertyTypeCodeSequence", []) or []}
    sides = _laterality(segment)
    by_code = [info.value for info in labels
               if (info.code.scheme.upper(), info.code.value) in types
               and (info.laterality.scheme.upper(), info.laterality.value) in sides]
    if len(by_code) == 1:
        return SegmentMatch(number, by_code[0], "code", text)
    value = label_from_text(text, labels)
    if value is not None:
        return SegmentMatch(number, value, "label text", text)
    return None


def _frame_geometry(seg: Dataset, index: int) -> tuple[np.ndarray | None, np.ndarray | None, tuple | None, int | None]:
    """(position, orientation, pixel spacing, segment number) of frame ``index`` from the
    per-frame functional groups, falling back to the shared ones."""
    per_frame = seg.PerFrameFunctionalGroupsSequence[index] if "PerFrameFunctionalGroupsSequence" in seg else Dataset()
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()

    def find(keyword: str) -> Dataset | None:
        for group in (per_frame, shared):
            if keyword in group and len(group[keyword].value):
                return group[keyword].value[0]
        return None

    position = find("PlanePositionSequence")
    orientation = find("PlaneOrientationSequence")
    measures = find("PixelMeasuresSequence")
    ident = find("SegmentIdentificationSequence")
    return (np.asarray(position.ImagePositionPatient, dtype=np.float64) if position is not None else None,
            np.asarray(orientation.ImageOrientationPatient, dtype=np.float64) if orientation is not None else None,
            tuple(float(v) for v in measures.PixelSpacing) if measures is not None and "PixelSpacing" in measures
            else None,
            int(ident.ReferencedSegmentNumber) if ident is not None else None)


def read_correction(seg: Dataset, source: SourceSeries, labels: Sequence[LabelInfo]) -> Correction:
    """Check a SEG against its source series and map it to the model's labels.

    Args:
        seg: the SEG data set (pixel data included).
        source: the series it claims to segment (:func:`read_source_series`).
        labels: the model's label table (``ModelBundle.labels``).

    Raises:
        CorrectionRefused: not a SEG, another frame of reference or series, an unknown or
            empty segment, or frames off the series' grid (the reason says which).
    """
    if str(seg.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise CorrectionRefused("not a DICOM Segmentation (BINARY or FRACTIONAL)")
    if referenced_series_uid(seg) != source.series_uid:
        raise CorrectionRefused("the SEG does not reference the analysed series")
    if str(seg.get("FrameOfReferenceUID", "")) != source.frame_of_reference_uid:
        raise CorrectionRefused("wrong frame of reference: the SEG's FrameOfReferenceUID differs from the series'")
    if (int(seg.Rows), int(seg.Columns)) != (source.image.shape[1], source.image.shape[0]):
        raise CorrectionRefused(f"mismatched geometry: SEG frames are {seg.Rows}x{seg.Columns}, the series' images "
                                f"{source.image.shape[1]}x{source.image.shape[0]}")
    segments = list(seg.get("SegmentSequence", []) or [])
    if not segments:
        raise CorrectionRefused("the SEG has no segments")
    matches: dict[int, SegmentMatch] = {}
    for segment in segments:
        match = match_segment(segment, labels)
        if match is None:
            raise CorrectionRefused(f"unknown segment {int(segment.get('SegmentNumber', 0))} "
                                    f"{str(segment.get('SegmentLabel', ''))[:64]!r}: neither its codes nor its label "
                                    "name a muscle of the model with its side")
        matches[match.number] = match
    values = [m.label for m in matches.values()]
    if len(set(values)) != len(values):
        raise CorrectionRefused("two segments name the same muscle and side")

    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:
        frames = frames[None]
    if str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        frames = frames.astype(np.float32) / float(seg.get("MaximumFractionalValue", 255)) >= 0.5
    label = np.zeros(source.image.shape, dtype=np.uint8)
    voxels = {number: 0 for number in matches}
    normal = np.cross(source.orientation[:3], source.orientation[3:])
    slice_offsets = source.positions_lps @ normal
    for index in range(frames.shape[0]):
        position, orientation, spacing, number = _frame_geometry(seg, index)
        if number not in matches:
            raise CorrectionRefused(f"frame {index + 1} refers to segment {number}, which the SEG does not describe")
        if position is None or orientation is None or spacing is None:
            raise CorrectionRefused(f"mismatched geometry: frame {index + 1} has no plane position, orientation or "
                                    "pixel spacing")
        if not np.allclose(orientation, source.orientation, atol=ORIENTATION_TOLERANCE):
            raise CorrectionRefused(f"mismatched geometry: frame {index + 1} is not parallel to the series' slices")
        if not np.allclose(spacing, source.pixel_spacing, atol=SPACING_TOLERANCE_MM):
            raise CorrectionRefused(f"mismatched geometry: frame {index + 1} pixel spacing {spacing} differs from the "
                                    f"series' {source.pixel_spacing}")
        k = int(np.argmin(np.abs(slice_offsets - float(position @ normal))))
        if np.linalg.norm(source.positions_lps[k] - position) > POSITION_TOLERANCE_MM:
            raise CorrectionRefused(f"mismatched geometry: frame {index + 1} does not lie on a slice of the series "
                                    f"(nearest is {np.linalg.norm(source.positions_lps[k] - position):.2f} mm away)")
        mask = np.asarray(frames[index]).astype(bool).T  # (rows, cols) -> (I, J)
        label[:, :, k][mask] = matches[number].label
        voxels[number] += int(mask.sum())
    empty = [f"{n} {matches[n].text[:64]!r}" for n, count in voxels.items() if count == 0]
    if empty:
        raise CorrectionRefused(f"empty segment(s) {', '.join(empty)}: no voxel on the series")
    fallbacks = tuple(f"segment {m.number} {m.text[:64]!r} -> label {m.label} by its label text (codes did not "
                      "name a muscle and side)" for m in matches.values() if m.matched_by != "code")
    return Correction(label=label, labelled_classes=tuple(sorted({0, *values})),
                      segments=tuple(sorted(matches.values(), key=lambda m: m.number)),
                      series_uid=source.series_uid, sop_uid=str(seg.SOPInstanceUID),
                      study_uid=str(seg.StudyInstanceUID), fallbacks=fallbacks)
