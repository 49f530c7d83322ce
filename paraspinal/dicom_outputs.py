"""DICOM SEG (BINARY) and TID 1500 Comprehensive 3D SR built with highdicom.

Output UIDs are derived from the source series UID, the stack number, the model's weight
hash and the object kind, so re-running the same input with the same model yields the same
SOP Instance UIDs: a resend is idempotent at the PACS, and a new model version gives new
objects instead of silently replacing old ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app.config import OutputSettings
from paraspinal.model_bundle import Code, LabelInfo, ModelBundle
from paraspinal.quantification import MuscleMeasurement
from paraspinal.stacks import StackVolume

# No standard code names these methods; a private scheme (99-prefixed, DICOM PS3.16 8.2) is honest.
PRIVATE_SCHEME = "99PARASPINAL"
FAT_METHOD_CODES = {
    "otsu": hd.sr.CodedConcept("OTSU", PRIVATE_SCHEME, "Otsu threshold within muscle"),
}
SOFTWARE_VERSION = "0.1.0"


def stable_uid(*parts: str) -> str:
    """A UID determined by ``parts`` (pydicom's 2.25 hash-based UID)."""
    return generate_uid(prefix=None, entropy_srcs=[str(p) for p in parts])


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


@dataclass
class SegmentationResult:
    """A written SEG and the segment number given to each label value."""

    dataset: Dataset
    segment_numbers: dict[int, int]  # label value -> segment number
    stack_index: int


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
    key = (stack.series_uid, str(stack.index), bundle.weights_sha256)
    descriptions = [
        _segment_description(numbers[info.value], info, bundle, stable_uid(*key, "track", str(info.value)))
        for info in present
    ]
    seg = hd.seg.Segmentation(
        source_images=stack.datasets,
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
    return SegmentationResult(dataset=seg, segment_numbers=numbers, stack_index=stack.index)


def _measurement_group(seg: SegmentationResult, stack: StackVolume, m: MuscleMeasurement, info: LabelInfo,
                       bundle: ModelBundle) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(name=bundle.name, version=bundle.version)
    site = hd.sr.FindingSite(anatomic_location=coded(info.code), laterality=coded(info.laterality))
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=m.volume_cm3, unit=codes.UCUM.CubicCentimeter,
                          algorithm_id=algorithm),
        hd.sr.Measurement(name=codes.SCT.Area, value=round(m.mean_csa_mm2 / 100.0, 3),
                          unit=hd.sr.CodedConcept("cm2", "UCUM", "square centimeter"),
                          derivation=codes.SCT.Mean, algorithm_id=algorithm),
        hd.sr.Measurement(name=codes.SCT.Area, value=round(m.max_csa_mm2 / 100.0, 3),
                          unit=hd.sr.CodedConcept("cm2", "UCUM", "square centimeter"),
                          derivation=codes.SCT.Maximum, algorithm_id=algorithm),
    ]
    if m.fat_fraction_pct is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.DCM.FatFraction, value=m.fat_fraction_pct, unit=codes.UCUM.Percent,
            method=FAT_METHOD_CODES.get(m.fat_method), algorithm_id=algorithm))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid(stack.series_uid, str(stack.index), bundle.weights_sha256, "group", str(info.value)),
            identifier=f"stack {stack.index} {info.name}",
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.dataset.SOPClassUID,
            sop_instance_uid=seg.dataset.SOPInstanceUID,
            segment_number=seg.segment_numbers[info.value],
            source_series=hd.sr.SourceSeriesForSegmentation(stack.series_uid),
        ),
        finding_type=coded(info.code),
        finding_sites=[site],
        algorithm_id=algorithm,
        measurements=measurements,
    )


def build_measurement_report(results: list[tuple[StackVolume, SegmentationResult, list[MuscleMeasurement]]],
                             bundle: ModelBundle, settings: OutputSettings) -> Dataset:
    """One TID 1500 Comprehensive 3D SR for the study: a volumetric group per found muscle per stack."""
    groups = []
    for stack, seg, measures in results:
        for m in measures:
            if m.found and m.label in seg.segment_numbers:
                groups.append(_measurement_group(seg, stack, m, bundle.label(m.label), bundle))
    if not groups:
        raise ValueError("no muscle was found in any stack: nothing to report")
    first_stack = results[0][0]
    device_uid = stable_uid("device", bundle.name, bundle.version)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=device_uid, name=settings.manufacturer_model_name,
                    manufacturer_name=settings.manufacturer, model_name=f"{bundle.name} {bundle.version}",
                ),
            ),
        ),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    key = [first_stack.series_uid, bundle.weights_sha256] + [s.dataset.SOPInstanceUID for _, s, _ in results]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg.dataset for _, seg, _ in results],
        content=report,
        series_instance_uid=stable_uid(*key, "sr-series"),
        series_number=settings.sr_series_number,
        sop_instance_uid=stable_uid(*key, "sr-instance"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        institution_name=settings.institution_name or None,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=settings.sr_series_description,
    )
    sr.CodingSchemeIdentificationSequence = [_private_scheme_identification()]
    return sr


def _private_scheme_identification() -> Dataset:
    """Declares the private coding scheme used for method names (PS3.3 C.12.1.1.3.1)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "Paraspinal Muscle Node methods"
    item.CodingSchemeResponsibleOrganization = "Paraspinal Muscle Node project"
    return item
