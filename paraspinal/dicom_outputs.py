"""DICOM SEG (BINARY) and TID 1500 Comprehensive 3D SR built with highdicom.

Output UIDs are derived from the source series UID, the stack number, the stack's source
SOP Instance UIDs, the model's weight hash and the object kind, so re-running the same input
with the same model yields the same SOP Instance UIDs (a resend is idempotent at the PACS),
while a series that gained slices or a new model version gives new objects instead of
silently replacing old ones.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from paraspinal.enhanced_mr import seg_source_arguments, source_key
from paraspinal.model_bundle import Code, LabelInfo, ModelBundle
from paraspinal.quality import CHECKS
from paraspinal.fat_methods import fat_method
from paraspinal.key_slices import KeySlice, key_slices
from paraspinal.levels import spine_level
from paraspinal.muscle_outlines import Outline, muscle_outline
from paraspinal.quantification import LevelMeasure, MuscleMeasurement
from paraspinal.settings import OutputSettings
from paraspinal.stacks import StackVolume

# No standard code names these methods; a private scheme (99-prefixed, DICOM PS3.16 8.2) is honest.
PRIVATE_SCHEME = "99PARASPINAL"
SOFTWARE_VERSION = "0.1.0"


def stable_uid(*parts: str) -> str:
    """A UID determined by ``parts``: ``2.25.<integer of a UUID made from their SHA-256>``.

    (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the sources and is random.)
    """
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


def content_key(measurements: Iterable[MuscleMeasurement]) -> str:
    """SHA-256 (hex) of what decides an SR's or report's content besides the source images and the
    weights: fat method, bias correction, Dixon series and lumbar-level sources used, and the review
    flags (their thresholds are configuration).

    Part of the SR and report UIDs: re-analysing the same input the same way gives the same UIDs
    (a resend is idempotent at the PACS), while a new level SEG or another fat method gives new
    UIDs (never two different objects under one SOP Instance UID)."""
    parts = set()
    for m in measurements:
        if not m.found:
            continue
        parts.add(f"fat:{m.fat_method}:{m.bias_correction}")
        if m.pdff_source:
            parts.add("dixon:" + json.dumps(m.pdff_source, sort_keys=True, default=str))
        for source in m.level_sources:
            parts.add(f"level:{source.get('sop_instance_uid', '')}")
        if m.quality is not None:
            parts.add(f"qc:{m.stack_index}:{m.label}:{','.join(m.quality.checks)}")
    return hashlib.sha256("\x00".join(sorted(parts)).encode()).hexdigest()


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


@dataclass
class SegmentationResult:
    """A written SEG, the segment number given to each label value and the label array it was
    made from ((slice, row, column) in the stack's slice order and the source images' pixel grid;
    the SR outlines the muscles from it)."""

    dataset: Dataset
    segment_numbers: dict[int, int]  # label value -> segment number
    stack_index: int
    labels: np.ndarray | None = None


def _algorithm(bundle: ModelBundle) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=bundle.name, family=codes.cid7162.ArtificialIntelligence, version=bundle.version,
        source=f"weights sha256 {bundle.weights_sha256[:16]}",
    )


def _segment_description(number: int, info: LabelInfo, bundle: ModelBundle, tracking_uid: str) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=info.name,
        segmented_property_category=coded(info.category),
        segmented_property_type=coded(info.code),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(bundle),
        tracking_uid=tracking_uid,
        tracking_id=info.name,
        display_color=hd.color.CIELabColor.from_rgb(*info.color_rgb),
    )
    # Laterality is a modifier of the property type (PS3.3 C.8.20.2); highdicom has no argument for it.
    modifier = Dataset()
    modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning = (
        info.laterality.value, info.laterality.scheme, info.laterality.meaning)
    description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


def build_segmentation(stack: StackVolume, labels: np.ndarray, bundle: ModelBundle,
                       settings: OutputSettings) -> SegmentationResult | None:
    """One BINARY SEG for one stack; ``None`` when no label is present in the stack.

    Only labels present in the stack become segments (numbered from 1 in label order),
    because an empty segment carries no frames and confuses viewers.
    """
    present = [info for info in bundle.labels if np.any(labels == info.value)]
    if not present:
        return None
    numbers = {info.value: i for i, info in enumerate(present, start=1)}
    remapped = np.zeros(labels.shape, dtype=np.uint8)
    for value, number in numbers.items():
        remapped[labels == value] = number
    # The source instances are part of the key: a series that gained or lost slices gives new objects.
    sources = hashlib.sha256("\\".join(sorted(source_key(ds.SOPInstanceUID, stack.frame_number(k))
                                               for k, ds in enumerate(stack.datasets))).encode()).hexdigest()
    key = (stack.series_uid, str(stack.index), bundle.weights_sha256, sources)
    descriptions = [
        _segment_description(numbers[info.value], info, bundle, stable_uid(*key, "track", str(info.value)))
        for info in present
    ]
    seg = hd.seg.Segmentation(
        **seg_source_arguments(stack),  # classic images, or the frames of a multi-frame instance
        pixel_array=remapped,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=stable_uid(*key, "seg-series"),
        series_number=settings.seg_series_number + stack.index - 1,
        sop_instance_uid=stable_uid(*key, "seg-instance"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.manufacturer_model_name,
        software_versions=f"{SOFTWARE_VERSION} model {bundle.name} {bundle.version}",
        device_serial_number="0",
        content_label="MUSCLES",
        content_description=f"Paraspinal muscles, stack {stack.index} (research use only)"[:64],
        content_creator_name="PARASPINAL^NODE",
        series_description=settings.seg_series_description,
    )
    return SegmentationResult(dataset=seg, segment_numbers=numbers, stack_index=stack.index, labels=labels)


# Concepts without a standard code (private scheme, declared in every SR).
FAT_AREA = hd.sr.CodedConcept("FATCSA", PRIVATE_SCHEME, "Fat cross-sectional area")
LEAN_AREA = hd.sr.CodedConcept("LEANCSA", PRIVATE_SCHEME, "Lean cross-sectional area")
ASYMMETRY_INDEX = hd.sr.CodedConcept("ASYMIDX", PRIVATE_SCHEME, "Left-right volume asymmetry index")
GOUTALLIER_GRADE = hd.sr.CodedConcept("GOUTALLIER", PRIVATE_SCHEME, "Simplified Goutallier grade")
GOUTALLIER_VALUES = {
    "normal/mild": hd.sr.CodedConcept("GOUT01", PRIVATE_SCHEME, "Normal or mild fatty infiltration (< 10 %)"),
    "moderate": hd.sr.CodedConcept("GOUT2", PRIVATE_SCHEME, "Moderate fatty infiltration (10-50 %)"),
    "severe": hd.sr.CodedConcept("GOUT34", PRIVATE_SCHEME, "Severe fatty infiltration (> 50 %)"),
}
# Quality control (paraspinal.quality): the review flag, each check that fired, and the outline
# uncertainty, in every muscle's volumetric group (TID 1419 qualitative evaluations).
REVIEW_RECOMMENDED = hd.sr.CodedConcept("REVIEWREC", PRIVATE_SCHEME, "Review recommended")
REVIEW_REASON = hd.sr.CodedConcept("REVIEWWHY", PRIVATE_SCHEME, "Reason for review")
REVIEW_REASONS = {key: hd.sr.CodedConcept(f"QC{key.upper().replace('_', '')}"[:16], PRIVATE_SCHEME, text)
                  for key, text in CHECKS.items()}
OUTLINE_UNCERTAINTY = hd.sr.CodedConcept("OUTLINEUNC", PRIVATE_SCHEME, "Outline uncertainty")
UNIT_RATIO = hd.sr.CodedConcept("1", "UCUM", "no units")
DIXON_PDFF_METHOD = hd.sr.CodedConcept("DIXONPDFF", PRIVATE_SCHEME, "Dixon proton density fat fraction F/(W+F)")
UNIT_MM2 = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
UNIT_CM2 = hd.sr.CodedConcept("cm2", "UCUM", "square centimeter")
#: The Dixon PDFF beside the T2 fat fraction in an outline group: its own name, so that a viewer
#: listing only concept names (OHIF) does not show two "Fat fraction" lines.
PDFF = hd.sr.CodedConcept("PDFF", PRIVATE_SCHEME, "Proton density fat fraction (Dixon)")


@functools.lru_cache(maxsize=None)
def dixon_pdff_method(erosion_voxels: int) -> hd.sr.CodedConcept:
    """The Dixon PDFF method, naming the in-plane erosion of the mask it was measured in
    (``DIXONPDFFE<N>``); :data:`DIXON_PDFF_METHOD` where the mask was not eroded."""
    if not erosion_voxels:
        return DIXON_PDFF_METHOD
    return hd.sr.CodedConcept(f"DIXONPDFFE{erosion_voxels}", PRIVATE_SCHEME,
                              f"Dixon PDFF F/(W+F), mask eroded in-plane {erosion_voxels} voxel"[:64])


def fat_method_concept(key: str, bias_correction: str = "none") -> hd.sr.CodedConcept:
    """The private code naming a fat method (and N4 when it ran first)."""
    method = fat_method(key)
    if bias_correction == "n4":
        return hd.sr.CodedConcept(method.code + "N4", PRIVATE_SCHEME, (method.meaning + ", N4-corrected")[:64])
    return hd.sr.CodedConcept(method.code, PRIVATE_SCHEME, method.meaning)


def seg_frame_numbers(seg: Dataset) -> dict[tuple[int, str], int]:
    """(segment number, source image key) -> frame number (1-based) of a BINARY SEG; the key is the
    source SOP Instance UID, with ``#<frame>`` for a frame of a multi-frame source (:func:`source_key`)."""
    out = {}
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                referenced = source.get("ReferencedFrameNumber")
                key = source_key(source.ReferencedSOPInstanceUID, None if referenced is None else int(referenced))
                out[(number, key)] = i
    return out


def _slice_tracking(stack: StackVolume, m: MuscleMeasurement, info: LabelInfo, bundle: ModelBundle,
                    k: int, suffix: str = "") -> hd.sr.TrackingIdentifier:
    level = m.slice_level[k] if k < len(m.slice_level) else None
    where = f"level {level}" if level else f"z {m.slice_z_mm[k]:+.1f} mm"
    return hd.sr.TrackingIdentifier(
        uid=stable_uid(stack.series_uid, str(stack.index), bundle.weights_sha256, "slice", str(info.value), str(k),
                       suffix),
        identifier=f"stack {stack.index} {info.name} slice {k + 1} {where}{suffix}"[:64],
    )


def level_site(name: str) -> hd.sr.FindingSite:
    """The finding site naming a lumbar level: "Level of L4/L5 intervertebral disc" (CID 1003) for a
    disc level, the vertebra ("L4 vertebra", CID 7603) for a vertebral level (see :mod:`paraspinal.levels`)."""
    value, scheme, meaning = spine_level(name).site_code()
    return hd.sr.FindingSite(anatomic_location=hd.sr.CodedConcept(value, scheme, meaning))


#: Concepts every per-slice group uses, as highdicom objects made once. Content items hold their
#: concepts by reference, so one object may sit in many items; nothing edits them afterwards.
AREA = hd.sr.CodedConcept.from_code(codes.SCT.Area)
FAT_FRACTION = hd.sr.CodedConcept.from_code(codes.DCM.FatFraction)
PERCENT = hd.sr.CodedConcept.from_code(codes.UCUM.Percent)


@dataclass
class _MuscleParts:
    """What every per-slice group of one muscle and side shares, built once per muscle."""

    algorithm: hd.sr.AlgorithmIdentification
    site: hd.sr.FindingSite
    finding_type: hd.sr.CodedConcept
    method: hd.sr.CodedConcept

    @classmethod
    def of(cls, m: MuscleMeasurement, info: LabelInfo, bundle: ModelBundle) -> "_MuscleParts":
        return cls(algorithm=hd.sr.AlgorithmIdentification(name=bundle.name, version=bundle.version),
                   site=hd.sr.FindingSite(anatomic_location=coded(info.code), laterality=coded(info.laterality)),
                   finding_type=coded(info.code), method=fat_method_concept(m.fat_method, m.bias_correction))


def _slice_group(seg: SegmentationResult, frames: dict[tuple[int, str], int], stack: StackVolume,
                 m: MuscleMeasurement, info: LabelInfo, bundle: ModelBundle, k: int,
                 dixon: bool = False, parts: _MuscleParts | None = None
                 ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """TID 1410 planar group of one muscle on one slice, referencing its SEG frame on that slice.

    ``dixon=False``: CSA, fat CSA, lean CSA (mm2) and fat fraction (%) by the T2 method;
    ``dixon=True``: the Dixon PDFF (%) on that slice (its own group, so that the group-level
    measurement method -- the only one dcmqi's tid1500reader reads -- names it).
    ``parts``: the muscle's shared concepts (:class:`_MuscleParts`), made here when not given.
    """
    source = stack.datasets[k]
    number = seg.segment_numbers[info.value]
    frame = frames.get((number, source_key(source.SOPInstanceUID, stack.frame_number(k))))
    if frame is None:
        return None
    if dixon and (k >= len(m.slice_pdff_pct) or m.slice_pdff_pct[k] is None):
        return None
    parts = parts or _MuscleParts.of(m, info, bundle)
    algorithm = parts.algorithm
    level = m.slice_level[k] if k < len(m.slice_level) else None
    sites = [parts.site, level_site(level)] if level else [parts.site]
    if dixon:
        method = dixon_pdff_method(m.pdff_erosion_voxels)
        measurements = [hd.sr.Measurement(name=FAT_FRACTION, value=m.slice_pdff_pct[k], unit=PERCENT,
                                          method=method)]
    else:
        method = parts.method
        measurements = [
            hd.sr.Measurement(name=AREA, value=m.slice_csa_mm2[k], unit=UNIT_MM2, algorithm_id=algorithm),
            hd.sr.Measurement(name=FAT_AREA, value=m.slice_fat_csa_mm2[k], unit=UNIT_MM2, method=method,
                              algorithm_id=algorithm),
            hd.sr.Measurement(name=LEAN_AREA, value=m.slice_lean_csa_mm2[k], unit=UNIT_MM2, method=method,
                              algorithm_id=algorithm),
        ]
        if m.slice_fat_fraction_pct[k] is not None:
            measurements.append(hd.sr.Measurement(name=FAT_FRACTION, value=m.slice_fat_fraction_pct[k],
                                                  unit=PERCENT, method=method, algorithm_id=algorithm))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_slice_tracking(stack, m, info, bundle, k, " PDFF" if dixon else ""),
        referenced_segment=hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=seg.dataset.SOPClassUID, sop_instance_uid=seg.dataset.SOPInstanceUID,
            frame_number=frame, segment_number=number,
            source_image=_source_image(stack, [k]),
        ),
        finding_type=parts.finding_type,
        method=method,
        finding_sites=sites,
        algorithm_id=None if dixon else algorithm,
        measurements=measurements,
    )
    _reference_frame_only(group)
    return group


def _source_image(stack: StackVolume, slices: list[int]) -> hd.sr.SourceImageForSegmentation:
    """The source image of slice ``slices[0]``; for frames of a multi-frame instance, that instance
    with the frame numbers of all ``slices`` (one multi-frame instance per stack, see
    :func:`paraspinal.enhanced_mr.seg_source_arguments`)."""
    source = stack.datasets[slices[0]]
    frames = [stack.frame_number(k) for k in slices if stack.frame_number(k) is not None]
    return hd.sr.SourceImageForSegmentation(str(source.SOPClassUID), str(source.SOPInstanceUID),
                                            referenced_frame_numbers=frames or None)


def _reference_frame_only(items) -> None:
    """Drop ReferencedSegmentNumber where a ReferencedFrameNumber is given in the same reference.

    PS3.3 (Image SOP Instance Reference Macro): a reference to a SEG names frames OR segments;
    highdicom writes both for a segmentation frame and dciodvfy flags it. The frame (one frame
    of a BINARY SEG holds one segment on one source image) already implies the segment.
    """
    for item in items:  # content items (datasets) of a content sequence / template
        for reference in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in reference and "ReferencedSegmentNumber" in reference:
                del reference.ReferencedSegmentNumber
        _reference_frame_only(item.get("ContentSequence", []))


#: Hook for per-group qualitative evaluations of an outline group (e.g. a "review recommended"
#: flag): called with the muscle's measures and the key slice, returns the evaluations to add.
OutlineEvaluator = Callable[[MuscleMeasurement, KeySlice], Sequence[hd.sr.QualitativeEvaluation]]


def review_flag_evaluations(m: MuscleMeasurement, key: KeySlice) -> list[hd.sr.QualitativeEvaluation]:
    """The default :data:`OutlineEvaluator`: the muscle's review flag and reasons (quality control),
    so a viewer that shows only the outline groups still carries them."""
    return _quality_items(m, None)[1]


def outline_tracking_identifier(info: LabelInfo, key: KeySlice, stack_index: int | None = None) -> str:
    """What a reader sees as the measurement's name: "erector spinae left, L4/L5" where the level is
    known, else "erector spinae left, slice 12" (1-based slice in the stack); ``stack_index`` adds
    "stack N: " (only for a study with several stacks)."""
    where = key.level if key.level else f"slice {key.index + 1}"
    prefix = f"stack {stack_index}: " if stack_index is not None else ""
    return f"{prefix}{info.name}, {where}"[:64]


#: OHIF (3.x, through @cornerstonejs/adapters) turns an SR measurement group into one of its own
#: tracked measurements -- listed in its measurements panel, drawn, navigable -- only when the
#: group's tracking identifier starts with a Cornerstone tool's identifier; a closed polyline is its
#: PlanarFreehandROI. The readable name follows after a colon, so other viewers still show it.
OHIF_FREEHAND_TRACKING_PREFIX = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"


def outline_label(m: MuscleMeasurement, info: LabelInfo, key: KeySlice, stack_label: int | None = None) -> str:
    """The one line a viewer's measurement list shows for an outline: its name
    (:func:`outline_tracking_identifier`), the fat fraction (%) and Dixon PDFF (%) on that slice
    where measured, and "review recommended" where quality control flagged the muscle, e.g.
    "erector spinae left, L4/L5: fat 12.3 %, PDFF 8.1 %". (OHIF lists a measurement by this label
    and its area; it shows no other numbers of a freehand ROI.)"""
    k = key.index
    figures = []
    if m.slice_fat_fraction_pct[k] is not None:
        figures.append(f"fat {m.slice_fat_fraction_pct[k]:.1f} %")
    pdff = m.slice_pdff_pct[k] if k < len(m.slice_pdff_pct) else None
    if pdff is not None:
        figures.append(f"PDFF {pdff:.1f} %")
    if m.quality is not None and m.quality.review_recommended:
        figures.append("review recommended")
    name = outline_tracking_identifier(info, key, stack_label)
    return f"{name}: {', '.join(figures)}" if figures else name


def _for_ohif(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, region: hd.sr.ImageRegion,
              label: str) -> None:
    """Make an outline group one OHIF can take over as its own measurement (in place):

    * the tracking identifier gets :data:`OHIF_FREEHAND_TRACKING_PREFIX` before the readable name;
    * the first measurement (the area) is INFERRED FROM a copy of the group's image region (TID 300
      allows it through TID 320): the adapters look for the outline under the first NUM item, as
      OHIF writes it;
    * a Comment (DCM 121106) TEXT item holds ``label`` (:func:`outline_label`), which OHIF shows as
      the measurement's label (TID 1410 is extensible).
    """
    items = group[0].ContentSequence
    for item in items:
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "112039":
            item.TextValue = f"{OHIF_FREEHAND_TRACKING_PREFIX}:{item.TextValue}"
    area = next(item for item in items if item.ValueType == "NUM")
    inferred = copy.deepcopy(region)
    inferred.RelationshipType = "INFERRED FROM"
    if "ContentSequence" not in area:
        area.ContentSequence = hd.sr.ContentSequence()
    area.ContentSequence.append(inferred)
    items.append(hd.sr.TextContentItem(name=codes.DCM.Comment, value=label,
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def _outline_group(stack: StackVolume, m: MuscleMeasurement, info: LabelInfo, bundle: ModelBundle,
                   key: KeySlice, outline: Outline, parts: _MuscleParts, stack_label: int | None,
                   evaluations: Sequence[hd.sr.QualitativeEvaluation] = (), for_ohif: bool = False
                   ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 planar group a viewer can draw: the muscle's outline on the key slice ``key.index``
    as a closed SCOORD POLYLINE in that source image's pixel coordinates (column, row), with the
    muscle's area on that slice (mm2, every piece of the muscle), its fat fraction (%) by the T2
    method (the group's method) and, where measured, the Dixon PDFF (%); finding sites the muscle
    with its laterality and, where known, the lumbar level. ``evaluations``: qualitative
    evaluations to add (see :data:`OutlineEvaluator`); ``for_ohif``: see :func:`_for_ohif`."""
    k = key.index
    source = stack.datasets[k]
    frame = stack.frame_number(k)  # a frame of an Enhanced MR instance: the region names it
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline.points,
        source_image=hd.sr.SourceImageForRegion(str(source.SOPClassUID), str(source.SOPInstanceUID),
                                                referenced_frame_numbers=[frame] if frame is not None else None))
    measurements = [hd.sr.Measurement(name=AREA, value=round(m.slice_csa_mm2[k], 2), unit=UNIT_MM2,
                                      algorithm_id=parts.algorithm)]
    if m.slice_fat_fraction_pct[k] is not None:
        measurements.append(hd.sr.Measurement(name=FAT_FRACTION, value=round(m.slice_fat_fraction_pct[k], 2),
                                              unit=PERCENT, method=parts.method, algorithm_id=parts.algorithm))
    pdff = m.slice_pdff_pct[k] if k < len(m.slice_pdff_pct) else None
    if pdff is not None:
        measurements.append(hd.sr.Measurement(name=PDFF, value=round(pdff, 2), unit=PERCENT,
                                              method=DIXON_PDFF_METHOD))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid(stack.series_uid, str(stack.index), bundle.weights_sha256, "outline", str(info.value),
                           str(k)),
            identifier=outline_tracking_identifier(info, key, stack_label)),
        referenced_region=region,
        # The viewer SR leaves out the finding (the muscle again): OHIF would list it a second time
        # under the finding site, which names the muscle with its laterality.
        finding_type=None if for_ohif else parts.finding_type,
        method=parts.method,
        finding_sites=[parts.site, level_site(key.level)] if key.level else [parts.site],
        algorithm_id=parts.algorithm,
        measurements=measurements,
        qualitative_evaluations=list(evaluations) or None,
    )
    if for_ohif:
        _for_ohif(group, region, outline_label(m, info, key, stack_label))
    return group


def outline_groups(stack: StackVolume, seg: SegmentationResult, measures: list[MuscleMeasurement],
                   bundle: ModelBundle, stack_label: int | None = None,
                   evaluate: OutlineEvaluator | None = review_flag_evaluations, for_ohif: bool = False
                   ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """The outline groups of one stack: per key slice (:func:`paraspinal.key_slices.key_slices`, the
    PDF's key images) and per muscle and side found on it, one :func:`_outline_group`, key slices
    head to feet as the PDF shows them, muscles in label order. Empty without ``seg.labels``.
    ``for_ohif``: groups OHIF takes over as its own measurements (:func:`_for_ohif`)."""
    if seg.labels is None:
        return []
    labels = seg.labels
    found = [m for m in measures if m.found and m.label in seg.segment_numbers]
    if not found:
        return []
    present = sorted({k for m in found for k in m.present_slices})
    keys = key_slices(found[0].slice_z_mm, found[0].slice_level, present,
                      lambda k: float(np.count_nonzero(labels[k])))
    groups = []
    for key in keys:
        for m in found:
            outline = muscle_outline(labels[key.index] == m.label)
            if outline is None:
                continue
            info = bundle.label(m.label)
            parts = _MuscleParts.of(m, info, bundle)
            groups.append(_outline_group(stack, m, info, bundle, key, outline, parts, stack_label,
                                         evaluate(m, key) if evaluate else (), for_ohif))
    return groups


def _referenced_segment(seg: SegmentationResult, stack: StackVolume, info: LabelInfo) -> hd.sr.ReferencedSegment:
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.dataset.SOPClassUID,
        sop_instance_uid=seg.dataset.SOPInstanceUID,
        segment_number=seg.segment_numbers[info.value],
        source_series=hd.sr.SourceSeriesForSegmentation(stack.series_uid),
    )


def _measurement_group(seg: SegmentationResult, stack: StackVolume, m: MuscleMeasurement, info: LabelInfo,
                       bundle: ModelBundle) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 volumetric group of one muscle and side in one stack, referencing its SEG segment:
    volume (cm3), mean/max CSA (cm2), volume-weighted fat fraction (%) by the T2 method (the
    group's measurement method), volume asymmetry index (%) and the simplified Goutallier grade."""
    algorithm = hd.sr.AlgorithmIdentification(name=bundle.name, version=bundle.version)
    site = hd.sr.FindingSite(anatomic_location=coded(info.code), laterality=coded(info.laterality))
    method = fat_method_concept(m.fat_method, m.bias_correction)
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=m.volume_cm3, unit=codes.UCUM.CubicCentimeter,
                          algorithm_id=algorithm),
        hd.sr.Measurement(name=codes.SCT.Area, value=round(m.mean_csa_mm2 / 100.0, 3), unit=UNIT_CM2,
                          derivation=codes.SCT.Mean, algorithm_id=algorithm),
        hd.sr.Measurement(name=codes.SCT.Area, value=round(m.max_csa_mm2 / 100.0, 3), unit=UNIT_CM2,
                          derivation=codes.SCT.Maximum, algorithm_id=algorithm),
    ]
    if m.fat_fraction_pct is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.DCM.FatFraction, value=m.fat_fraction_pct, unit=codes.UCUM.Percent,
            method=method, algorithm_id=algorithm))
    if m.asymmetry_index_pct is not None:
        measurements.append(hd.sr.Measurement(
            name=ASYMMETRY_INDEX, value=m.asymmetry_index_pct, unit=codes.UCUM.Percent, algorithm_id=algorithm))
    evaluations = []
    if m.goutallier_grade in GOUTALLIER_VALUES:
        evaluations.append(hd.sr.QualitativeEvaluation(GOUTALLIER_GRADE, GOUTALLIER_VALUES[m.goutallier_grade]))
    measurements_qc, evaluations_qc = _quality_items(m, algorithm)
    measurements += measurements_qc
    evaluations += evaluations_qc
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid(stack.series_uid, str(stack.index), bundle.weights_sha256, "group", str(info.value)),
            identifier=f"stack {stack.index} {info.name}",
        ),
        referenced_segment=_referenced_segment(seg, stack, info),
        finding_type=coded(info.code),
        method=method,
        finding_sites=[site],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def _not_found_group(stack: StackVolume, m: MuscleMeasurement, info: LabelInfo, bundle: ModelBundle
                     ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of a muscle and side that quality control flagged although the model did not
    find it ("stack N <muscle> <side> not found"): no segment to reference and no measurement, only
    the finding (type and site), "Review recommended" yes and the reason (e.g. "Not found on either
    side"), so that a reader of the SR, not only of the PDF, learns that the series may have failed."""
    algorithm = hd.sr.AlgorithmIdentification(name=bundle.name, version=bundle.version)
    _, evaluations = _quality_items(m, None)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid(stack.series_uid, str(stack.index), bundle.weights_sha256, "not-found", str(info.value)),
            identifier=f"stack {stack.index} {info.name} not found",
        ),
        finding_type=coded(info.code),
        finding_sites=[hd.sr.FindingSite(anatomic_location=coded(info.code), laterality=coded(info.laterality))],
        algorithm_id=algorithm,
        qualitative_evaluations=evaluations,
    )


def _quality_items(m: MuscleMeasurement, algorithm: hd.sr.AlgorithmIdentification | None
                   ) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The muscle's quality control as SR content: "Review recommended" yes/no, one "Reason for
    review" per check that fired, and the outline uncertainty (0..1, UCUM "1")."""
    if m.quality is None:
        return [], []
    evaluations = [hd.sr.QualitativeEvaluation(REVIEW_RECOMMENDED,
                                               codes.SCT.Yes if m.quality.review_recommended else codes.SCT.No)]
    evaluations += [hd.sr.QualitativeEvaluation(REVIEW_REASON, REVIEW_REASONS[key]) for key in m.quality.checks]
    measurements = []
    if m.quality.uncertainty is not None and algorithm is not None:
        measurements.append(hd.sr.Measurement(name=OUTLINE_UNCERTAINTY, value=m.quality.uncertainty, unit=UNIT_RATIO,
                                              algorithm_id=algorithm))
    return measurements, evaluations


def _level_group(seg: SegmentationResult, stack: StackVolume, m: MuscleMeasurement, info: LabelInfo,
                 bundle: ModelBundle, lm: LevelMeasure, dixon: bool = False
                 ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | None:
    """TID 1411 group of one muscle and side over the slices at one lumbar level: mean area (mm2)
    and fat fraction (%) by the T2 method over those slices; finding sites the muscle (with its
    laterality) and the level; the reference is the muscle's SEG segment with the source images
    of that level's slices. ``dixon=True``: the Dixon PDFF (%) over those slices instead, in its
    own group "... level <L> PDFF" (method DIXONPDFF, as the stack's PDFF group); ``None`` when
    no PDFF was measured at that level."""
    algorithm = hd.sr.AlgorithmIdentification(name=bundle.name, version=bundle.version)
    if dixon:
        if lm.pdff_pct is None:
            return None
        method = dixon_pdff_method(m.pdff_erosion_voxels)
        measurements = [hd.sr.Measurement(name=codes.DCM.FatFraction, value=lm.pdff_pct, unit=codes.UCUM.Percent,
                                          method=method)]
    else:
        method = fat_method_concept(m.fat_method, m.bias_correction)
        measurements = [hd.sr.Measurement(name=AREA, value=lm.mean_csa_mm2, unit=UNIT_MM2, derivation=codes.SCT.Mean,
                                          algorithm_id=algorithm)]
        if lm.fat_fraction_pct is not None:
            measurements.append(hd.sr.Measurement(name=FAT_FRACTION, value=lm.fat_fraction_pct, unit=PERCENT,
                                                  method=method, algorithm_id=algorithm))
    sources = ([hd.sr.SourceImageForSegmentation(str(stack.datasets[k].SOPClassUID),
                                                 str(stack.datasets[k].SOPInstanceUID)) for k in lm.slices]
               if not stack.is_multi_frame else [_source_image(stack, lm.slices)])
    suffix = " PDFF" if dixon else ""
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid(stack.series_uid, str(stack.index), bundle.weights_sha256, "level", str(info.value),
                           lm.level, *(("pdff",) if dixon else ())),
            identifier=f"stack {stack.index} {info.name} level {lm.level}{suffix}"[:64],
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.dataset.SOPClassUID, sop_instance_uid=seg.dataset.SOPInstanceUID,
            segment_number=seg.segment_numbers[info.value], source_images=sources),
        finding_type=coded(info.code),
        method=method,
        finding_sites=[hd.sr.FindingSite(anatomic_location=coded(info.code), laterality=coded(info.laterality)),
                       level_site(lm.level)],
        algorithm_id=None if dixon else algorithm,
        measurements=measurements,
    )


def _dixon_group(seg: SegmentationResult, stack: StackVolume, m: MuscleMeasurement, info: LabelInfo,
                 bundle: ModelBundle) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group with the Dixon PDFF (%) inside the same segment: the mean, and the median
    (derivation Median), in the mask eroded in-plane as the method names (:func:`dixon_pdff_method`)."""
    site = hd.sr.FindingSite(anatomic_location=coded(info.code), laterality=coded(info.laterality))
    method = dixon_pdff_method(m.pdff_erosion_voxels)
    measurements = [hd.sr.Measurement(name=codes.DCM.FatFraction, value=m.pdff_pct, unit=codes.UCUM.Percent,
                                      method=method)]
    if m.pdff_median_pct is not None:
        measurements.append(hd.sr.Measurement(name=codes.DCM.FatFraction, value=m.pdff_median_pct,
                                              unit=codes.UCUM.Percent, method=method, derivation=codes.SCT.Median))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid(stack.series_uid, str(stack.index), bundle.weights_sha256, "pdff", str(info.value)),
            identifier=f"stack {stack.index} {info.name} PDFF",
        ),
        referenced_segment=_referenced_segment(seg, stack, info),
        finding_type=coded(info.code),
        method=method,
        finding_sites=[site],
        measurements=measurements,
    )


def build_measurement_report(results: list[tuple[StackVolume, SegmentationResult, list[MuscleMeasurement]]],
                             bundle: ModelBundle, settings: OutputSettings, *,
                             per_slice_groups: bool = True, light_content: bool = True,
                             outlines: bool = True,
                             evaluate_outline: OutlineEvaluator | None = review_flag_evaluations) -> Dataset:
    """One TID 1500 Comprehensive 3D SR for the study.

    Groups, each referencing its SEG segment (volumetric) or SEG frame (planar), in this order:

    * per found muscle, side and stack, a volumetric group (TID 1411) "stack N <muscle> <side>":
      volume, mean and max CSA, fat fraction by the T2 method, asymmetry index, Goutallier grade,
      and its quality control (review flag, reasons, outline uncertainty);
    * per muscle, side and stack that was not found but flagged for review (found on one side
      only, or on neither: the model may have failed), a group (TID 1501) "stack N <muscle>
      <side> not found" with the review flag and its reason, and no measurement;
    * where Dixon PDFF was measured, a volumetric group "... PDFF" with the PDFF;
    * per lumbar level determined for slices holding the muscle, a volumetric group
      "stack N <muscle> <side> level <L>" with the mean CSA (mm2) and fat fraction (%) over the
      slices at that level, finding sites the muscle and the level, referencing the segment and
      the source images of those slices; where Dixon PDFF was measured there, "... level <L> PDFF";
    * with ``per_slice_groups``, per slice holding the muscle, a planar group (TID 1410)
      "stack N <muscle> <side> slice K z <z> mm" (or "level <L>" where determined) with CSA, fat
      CSA, lean CSA (mm2) and fat fraction (%), and where measured "... PDFF" with the slice PDFF;
    * last (OHIF 3.13.2 stops matching at the first group without geometry, from the end), with
      ``outlines``, the groups a viewer can draw (OHIF and most PACS viewers show only groups
      with image-region geometry): per key slice (one per lumbar level, else per ~30 mm band, the
      PDF's key images) and muscle, a planar group (TID 1410) "erector spinae left, L4/L5" (or
      "..., slice 12") whose region is the muscle's outline, a closed SCOORD POLYLINE on that
      source image, with area (mm2), fat fraction (%) and Dixon PDFF (%) where measured
      (:func:`outline_groups`; ``evaluate_outline`` may add qualitative evaluations to each).

    The fat method (and N4) is the measurement method of each fat group and of each fat
    measurement (private scheme 99PARASPINAL, declared in CodingSchemeIdentificationSequence).

    ``light_content=False`` hands highdicom the complete content (seconds slower with per-slice
    groups): the reference the default path must equal byte for byte (``tests/test_benchmarks_equivalence.py``).
    """
    groups: list = []
    not_found: list = []
    pdff_groups: list = []
    level_groups: list = []
    slice_groups: list = []
    drawn: list = []
    several_stacks = len(results) > 1
    for stack, seg, measures in results:
        if outlines:
            drawn += outline_groups(stack, seg, measures, bundle, stack.index if several_stacks else None,
                                    evaluate_outline)
        frames = seg_frame_numbers(seg.dataset) if per_slice_groups else {}
        for m in measures:
            if not m.found and m.quality is not None and m.quality.review_recommended:
                not_found.append(_not_found_group(stack, m, bundle.label(m.label), bundle))
            if not (m.found and m.label in seg.segment_numbers):
                continue
            info = bundle.label(m.label)
            groups.append(_measurement_group(seg, stack, m, info, bundle))
            if m.pdff_pct is not None:
                pdff_groups.append(_dixon_group(seg, stack, m, info, bundle))
            for lm in m.level_measures:
                for dixon in (False, True):
                    group = _level_group(seg, stack, m, info, bundle, lm, dixon=dixon)
                    if group is not None:
                        level_groups.append(group)
            if per_slice_groups:
                parts = _MuscleParts.of(m, info, bundle)
                for k in m.present_slices:
                    for dixon in (False, True):
                        group = _slice_group(seg, frames, stack, m, info, bundle, k, dixon=dixon, parts=parts)
                        if group is not None:
                            slice_groups.append(group)
    if not groups:
        raise ValueError("no muscle was found in any stack: nothing to report")
    first_stack = results[0][0]
    key = ([first_stack.series_uid, bundle.weights_sha256] + [s.dataset.SOPInstanceUID for _, s, _ in results]
           + [content_key(m for _, _, measures in results for m in measures)])
    evidence = [seg.dataset for _, seg, _ in results] + [ds for stack, _, _ in results for ds in stack.sources]
    report = _measurement_report(groups + not_found + pdff_groups + level_groups + slice_groups + drawn, bundle,
                                 settings)
    # highdicom's SR constructor deep-copies and re-parses the whole content tree and searches it
    # for references: seconds for thousands of per-slice items that highdicom built and checked
    # when they were made. It gets the same report without the per-slice groups; the complete
    # report's root then replaces that content (exactly what the constructor copies from the
    # content it is given), and their references are checked against the evidence here.
    light_content = light_content and bool(slice_groups)
    light = (_measurement_report(groups + not_found + pdff_groups + level_groups + drawn, bundle, settings)
             if light_content
             else report)
    sr = _sr_dataset(evidence, light, key, "sr", settings.sr_series_number, settings.sr_series_description,
                     settings)
    if light_content:
        _check_references(slice_groups, evidence)
        root = report[0]
        for tag, value in root.items():
            sr[tag] = value
        sr._content = hd.sr.ContentSequence([root], is_root=True)
    sr.CodingSchemeIdentificationSequence = [_private_scheme_identification()]
    return sr


def build_viewer_report(results: list[tuple[StackVolume, SegmentationResult, list[MuscleMeasurement]]],
                        bundle: ModelBundle, settings: OutputSettings, *,
                        evaluate_outline: OutlineEvaluator | None = review_flag_evaluations
                        ) -> Dataset | None:
    """The SR for viewers: a TID 1500 Comprehensive 3D SR holding only the outline groups of
    :func:`build_measurement_report` (:func:`outline_groups`: per key slice and muscle, the closed
    POLYLINE outline with area mm2, fat fraction % and PDFF %), in its own series
    (``settings.viewer_sr_series_number``); ``None`` when no muscle was outlined.

    Why a second object: OHIF 3.13.2 fails on an SR that holds any measurement group without
    image-region geometry (its SR viewport throws "Cannot read properties of undefined (reading
    'ReferencedSOPSequence')"), and the complete SR keeps its volumetric and per-slice groups
    for 3D Slicer / dcmqi. UIDs are derived like the complete SR's, with their own suffix."""
    several_stacks = len(results) > 1
    drawn = [group for stack, seg, measures in results
             for group in outline_groups(stack, seg, measures, bundle, stack.index if several_stacks else None,
                                         evaluate_outline, for_ohif=True)]
    if not drawn:
        return None
    first_stack = results[0][0]
    key = ([first_stack.series_uid, bundle.weights_sha256] + [s.dataset.SOPInstanceUID for _, s, _ in results]
           + [content_key(m for _, _, measures in results for m in measures)])
    evidence = [ds for stack, _, _ in results for ds in stack.datasets]
    # "-ohif": the layout changed (OHIF-trackable groups), so a PACS that holds the earlier layout
    # gets a new object, never a different one under a UID it already has.
    sr = _sr_dataset(evidence, _measurement_report(drawn, bundle, settings), key, "viewer-sr-ohif",
                     settings.viewer_sr_series_number, settings.viewer_sr_series_description, settings)
    sr.CodingSchemeIdentificationSequence = [_private_scheme_identification()]
    return sr


def _sr_dataset(evidence: list[Dataset], content, key: tuple, kind: str, series_number: int,
                series_description: str, settings) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR with UIDs derived from ``key`` and ``kind`` ("sr", "viewer-sr-ohif"), so the
    same analysis always gives the same series and instance UIDs."""
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=content,
        series_instance_uid=stable_uid(*key, f"{kind}-series"), series_number=series_number,
        sop_instance_uid=stable_uid(*key, f"{kind}-instance"), instance_number=1,
        manufacturer=settings.manufacturer, institution_name=settings.institution_name or None,
        is_complete=True, is_final=False, is_verified=False, series_description=series_description)


def _measurement_report(groups: list, bundle: ModelBundle, settings: OutputSettings) -> hd.sr.MeasurementReport:
    """The TID 1500 content: observer (this software as a device), procedure, the groups."""
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=stable_uid("device", bundle.name, bundle.version), name=settings.manufacturer_model_name,
                    manufacturer_name=settings.manufacturer, model_name=f"{bundle.name} {bundle.version}",
                ),
            ),
        ),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )


def _check_references(groups: list, evidence: list[Dataset]) -> None:
    """Every instance the groups reference is among the evidence (what highdicom checks for the
    content it is given); ``ValueError`` naming the missing ones otherwise."""
    known = {str(ds.SOPInstanceUID) for ds in evidence}
    referenced: set[str] = set()

    def walk(items) -> None:
        for item in items:
            for reference in item.get("ReferencedSOPSequence", []):
                referenced.add(str(reference.ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence", []))

    for group in groups:  # a template is a list of content items
        walk(group)
    missing = referenced - known
    if missing:
        raise ValueError(f"no evidence was provided for the referenced instance(s) {', '.join(sorted(missing))}")


def _private_scheme_identification() -> Dataset:
    """Declares the private coding scheme used for method names (PS3.3 C.12.1.1.3.1)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "Paraspinal Muscle Node methods"
    item.CodingSchemeResponsibleOrganization = "Paraspinal Muscle Node project"
    return item
