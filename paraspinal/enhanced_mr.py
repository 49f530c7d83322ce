"""Enhanced MR multi-frame instances as "frame sources": one classic-like header per frame.

Siemens XA scanners (Vida, Sola, Altea, Free.Max) and recent Philips systems export Enhanced MR
Image Storage (1.2.840.10008.5.1.4.1.1.4.1) by default; PACS conversions produce Legacy Converted
Enhanced MR Image Storage (1.2.840.10008.5.1.4.1.1.4.4). One instance holds many frames, each
frame's geometry and acquisition in functional groups (PS3.3 C.7.6.16): the Shared Functional
Groups Sequence holds what all frames share, the Per-Frame Functional Groups Sequence item N what
frame N has alone (a per-frame value overrides a shared one).

:func:`frame_headers` flattens each frame into a header with the classic attributes the rest of
the pipeline reads, so a frame is handled exactly as a classic single-frame image:

* ImagePositionPatient from the Plane Position (Patient) Sequence, ImageOrientationPatient from
  the Plane Orientation (Patient) Sequence, PixelSpacing and SliceThickness from the Pixel
  Measures Sequence (LPS patient mm);
* RepetitionTime from the MR Timing and Related Parameters Sequence, EchoTime from the MR Echo
  Sequence's EffectiveEchoTime (ms); a Legacy Converted instance carries both in its Unassigned
  Shared/Per-Frame Converted Attributes Sequences;
* ImageType from the MR Image Frame Type Sequence's FrameType (so Dixon water and fat frames of
  one instance are told apart per frame), else the instance's ImageType;
* RescaleSlope/RescaleIntercept from the Pixel Value Transformation Sequence.

Each flattened header keeps the instance's SOP Class and SOP Instance UID; the frame number
(1-based) travels beside it (:class:`paraspinal.dicom_index.InstanceRecord.frame_number`).
A frame that lacks a geometry attribute is left without it, so the stack planner names the
attribute and this module's :func:`explain` names the functional group it should be in.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import UID

if TYPE_CHECKING:  # stacks imports dicom_index, which imports this module
    from paraspinal.stacks import StackVolume

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.4")
#: Multi-frame MR SOP classes whose frames become frame sources.
MULTI_FRAME_MR_SOP_CLASSES = frozenset({ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE})
#: Every MR image SOP class the series selector analyses.
MR_IMAGE_SOP_CLASSES = frozenset({MR_IMAGE_STORAGE}) | MULTI_FRAME_MR_SOP_CLASSES

#: Where a classic attribute lives in an Enhanced MR instance (the functional group macro).
FUNCTIONAL_GROUP_OF = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "RepetitionTime": "MRTimingAndRelatedParametersSequence",
    "EchoTime": "MREchoSequence (EffectiveEchoTime)",
    "ImageType": "MRImageFrameTypeSequence (FrameType)",
}
#: Functional group macros that must hold exactly one item (PS3.3 C.7.6.16.2 and C.8.13.5).
_SINGLE_ITEM_MACROS = {"PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                       "MRTimingAndRelatedParametersSequence", "MREchoSequence", "MRImageFrameTypeSequence",
                       "PixelValueTransformationSequence", "FrameContentSequence"}
#: Functional group sequences whose items reference other instances: never flattened (their
#: ReferencedSOPInstanceUID would pose as the frame's own attributes).
_NOT_FLATTENED = {"ReferencedImageSequence", "DerivationImageSequence", "ConversionSourceAttributesSequence",
                  "RealWorldValueMappingSequence"}
#: Top-level elements a frame header does not copy: the functional groups themselves and the pixels.
_NOT_COPIED = {"SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PixelData",
               "FloatPixelData", "DoubleFloatPixelData", "DimensionIndexSequence", "NumberOfFrames"}


class FunctionalGroupError(ValueError):
    """The functional groups of a multi-frame instance are unusable; the message names the attribute."""


def is_multi_frame_mr(header: Dataset) -> bool:
    return str(header.get("SOPClassUID", "")) in MULTI_FRAME_MR_SOP_CLASSES


def number_of_frames(header: Dataset) -> int:
    """NumberOfFrames (0028,0008) as a positive int; :class:`FunctionalGroupError` otherwise."""
    value = header.get("NumberOfFrames")
    try:
        frames = int(value)
    except (TypeError, ValueError):
        raise FunctionalGroupError(f"NumberOfFrames (0028,0008) {'missing' if value in (None, '') else repr(value)}"
                                   " is not a positive number of frames") from None
    if frames < 1:
        raise FunctionalGroupError(f"NumberOfFrames (0028,0008) is {frames}, not a positive number of frames")
    return frames


def _flatten_group(target: Dataset, group: Dataset, where: str) -> None:
    """Copy the non-sequence elements of each macro in one functional group item into ``target``."""
    for element in group:
        if element.VR != "SQ" or element.keyword in _NOT_FLATTENED:
            continue
        items = element.value
        if not items:
            continue
        if len(items) != 1 and element.keyword in _SINGLE_ITEM_MACROS:
            raise FunctionalGroupError(f"{where} > {element.keyword} has {len(items)} items, expected 1")
        for inner in items[0]:
            if inner.VR != "SQ":
                target[inner.tag] = copy.deepcopy(inner)


def _replace(frame: Dataset, keyword: str, value) -> None:
    """Set ``keyword`` with a new element: the frames share the instance's element objects, and
    assigning to an existing one would change it in every frame."""
    if keyword in frame:
        del frame[keyword]
    setattr(frame, keyword, value)


def frame_headers(header: Dataset) -> list[Dataset]:
    """One classic-like header per frame (module docstring), in frame order (frame 1 first).

    Raises :class:`FunctionalGroupError` naming the attribute when NumberOfFrames or the
    Per-Frame Functional Groups Sequence is missing or inconsistent."""
    frames = number_of_frames(header)
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise FunctionalGroupError("PerFrameFunctionalGroupsSequence (5200,9230) missing")
    if len(per_frame) != frames:
        raise FunctionalGroupError(f"PerFrameFunctionalGroupsSequence (5200,9230) has {len(per_frame)} items, "
                                   f"NumberOfFrames is {frames}")
    shared_items = header.get("SharedFunctionalGroupsSequence") or []
    if len(shared_items) > 1:
        raise FunctionalGroupError(f"SharedFunctionalGroupsSequence (5200,9229) has {len(shared_items)} items, "
                                   "expected 1")
    base = Dataset()
    for element in header:
        if element.keyword not in _NOT_COPIED:
            base[element.tag] = element  # top-level values are read-only here: shared, not copied
    if shared_items:
        _flatten_group(base, shared_items[0], "SharedFunctionalGroupsSequence")
    out = []
    for number, item in enumerate(per_frame, start=1):
        frame = Dataset()
        for element in base:
            frame[element.tag] = element
        _flatten_group(frame, item, f"PerFrameFunctionalGroupsSequence item {number}")
        if "FrameType" in frame:
            _replace(frame, "ImageType", list(frame.FrameType))
        if "EffectiveEchoTime" in frame and "EchoTime" not in frame:
            _replace(frame, "EchoTime", frame.EffectiveEchoTime)
        _replace(frame, "InstanceNumber", number)  # the frame's place for sorting and log lines
        out.append(frame)
    return out


def explain(message: str) -> str:
    """A geometry or timing problem of a frame, with the functional group the attribute belongs in."""
    for keyword, group in FUNCTIONAL_GROUP_OF.items():
        if keyword in message:
            return f"{message} ({group} of the per-frame or shared functional groups)"
    return message


def seg_source_proxy(instance: Dataset, frame_numbers: Sequence[int], image_orientation: Sequence[float],
                     pixel_spacing: Sequence[float], slice_thickness: float | None) -> Dataset:
    """A header-only copy of a multi-frame ``instance`` for highdicom's Segmentation, for one stack.

    highdicom references the frames of a multi-frame source by matching plane positions, and
    wants one orientation for the whole source (in its shared functional groups). A lumbar
    Enhanced MR instance may hold several stacks at different angles, and frames at the same
    position (Dixon water and fat, several echoes). The proxy keeps the instance's UIDs and frame
    numbering, puts this stack's orientation and pixel measures in the shared groups, and moves
    every frame outside ``frame_numbers`` far away, so that each SEG frame references exactly the
    source frame it was derived from (ReferencedFrameNumber = the instance's own frame number).
    """
    proxy = Dataset()
    for element in instance:
        if element.keyword not in ("PixelData", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            proxy[element.tag] = element
    proxy.file_meta = getattr(instance, "file_meta", Dataset())
    shared = Dataset()
    if instance.get("SharedFunctionalGroupsSequence"):
        for element in instance.SharedFunctionalGroupsSequence[0]:
            shared[element.tag] = element
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [float(v) for v in image_orientation]
    measures.PixelSpacing = [float(v) for v in pixel_spacing]
    if slice_thickness:
        measures.SliceThickness = float(slice_thickness)
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    kept = set(int(f) for f in frame_numbers)
    per_frame = []
    for number, item in enumerate(instance.PerFrameFunctionalGroupsSequence, start=1):
        frame = Dataset()
        for element in item:
            if element.keyword not in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
                frame[element.tag] = element
        if number not in kept:
            position = Dataset()
            position.ImagePositionPatient = [1.0e7 + number, 1.0e7, 1.0e7]
            frame.PlanePositionSequence = [position]
        per_frame.append(frame)
    proxy.SharedFunctionalGroupsSequence = [shared]
    proxy.PerFrameFunctionalGroupsSequence = per_frame
    return proxy


def seg_source_arguments(stack: StackVolume) -> dict:
    """highdicom ``Segmentation`` arguments naming a stack's sources.

    Classic images: ``source_images`` = the stack's instances (one SEG frame per image). Frames of
    ONE multi-frame instance: ``source_images`` = a :func:`seg_source_proxy` of it and
    ``plane_positions`` = the frames' positions, so each SEG frame's Source Image Sequence carries
    the instance's UID and ReferencedFrameNumber (PS3.3 C.7.6.16.2.6: a reference to a frame of a
    multi-frame image names the frame). A stack drawn from several multi-frame instances is refused
    (highdicom derives a SEG from one multi-frame source) with a ``ValueError`` saying so."""
    import highdicom as hd

    if not stack.is_multi_frame:
        return {"source_images": stack.datasets}
    instances = {str(ds.SOPInstanceUID) for ds in stack.datasets}
    if len(instances) != 1 or any(f is None for f in stack.frame_numbers):
        raise ValueError(f"stack {stack.index} draws its slices from {len(instances)} instances, some multi-frame: "
                         "a SEG can reference the frames of one multi-frame instance only")
    (instance,) = stack.sources
    first = stack.datasets[0]
    proxy = seg_source_proxy(instance, [f for f in stack.frame_numbers if f is not None],
                             [float(v) for v in first.ImageOrientationPatient],
                             [float(v) for v in first.PixelSpacing], first.get("SliceThickness"))
    positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                          [float(v) for v in ds.ImagePositionPatient]) for ds in stack.datasets]
    return {"source_images": [proxy], "plane_positions": positions}


def source_key(sop_instance_uid: str, frame_number: int | None) -> str:
    """An image's identity: the SOP Instance UID, with ``#<frame>`` for a frame of a multi-frame instance."""
    return str(sop_instance_uid) if frame_number is None else f"{sop_instance_uid}#{frame_number}"
