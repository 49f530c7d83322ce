"""Editing a muscle SEG as a reader's viewer would: highdicom reads the node's SEG (or a
truth mask) and writes a new SEG instance of the same series with the edited segments."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from paraspinal.model_bundle import LabelInfo


def sorted_series(paths: Sequence[Path]) -> list[Dataset]:
    """The series' data sets in slice order (along the slice normal)."""
    datasets = [pydicom.dcmread(str(p)) for p in paths]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal)))


def description(number: int, info: LabelInfo, with_codes: bool = True, text: str | None = None
                ) -> hd.seg.SegmentDescription:
    """A manual segment; ``with_codes``: the muscle's SNOMED code plus laterality modifier
    (as Slicer keeps them), else a generic "Tissue" code so only the label text names it."""
    prop = (hd.sr.CodedConcept(info.code.value, info.code.scheme, info.code.meaning) if with_codes
            else codes.SCT.Tissue)
    desc = hd.seg.SegmentDescription(
        segment_number=number, segment_label=text or info.name,
        segmented_property_category=codes.SCT.Tissue if not with_codes else
        hd.sr.CodedConcept(info.category.value, info.category.scheme, info.category.meaning),
        segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    if with_codes:
        modifier = Dataset()
        modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning = (
            info.laterality.value, info.laterality.scheme, info.laterality.meaning)
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return desc


def write_seg(source: list[Dataset], masks: Sequence[np.ndarray], descriptions: Sequence[hd.seg.SegmentDescription],
              out: Path, series_number: int = 9101) -> Path:
    """A BINARY SEG of ``source`` (slice order) with one (K, rows, cols) bool mask per description."""
    pixels = np.stack(masks, axis=-1).astype(np.uint8) if masks else np.zeros((len(source), source[0].Rows,
                                                                                source[0].Columns, 0), np.uint8)
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=list(descriptions), series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="reader", manufacturer_model_name="viewer",
        software_versions="1", device_serial_number="1", omit_empty_frames=False)
    seg.save_as(str(out))
    return out


def node_seg_masks(seg_path: Path, source: list[Dataset]) -> dict[str, np.ndarray]:
    """The node's SEG per segment label, as (K, rows, cols) bool in ``source`` order."""
    seg = hd.seg.segread(str(seg_path))
    uids = [str(ds.SOPInstanceUID) for ds in source]
    numbers = list(seg.segment_numbers)
    array = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, assert_missing_frames_are_empty=True)
    return {str(seg.get_segment_description(n).segment_label): np.asarray(array[..., i]).astype(bool)
            for i, n in enumerate(numbers)}


def label_of(labels: Sequence[LabelInfo], name: str) -> LabelInfo:
    return next(info for info in labels if info.name == name)


def truth_masks(labels_vol: np.ndarray, values: Mapping[int, int]) -> list[np.ndarray]:
    """(K, rows, cols) masks of a truth label volume for phantom label values ``values``."""
    return [labels_vol == v for v in values]
