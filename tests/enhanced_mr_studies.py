"""Multi-frame MR studies built from the real cases, for the Enhanced MR tests.

* :func:`legacy_converted` - classic instances through highdicom's legacy converter
  (``LegacyConvertedEnhancedMRImage``, SOP class 1.2.840.10008.5.1.4.1.1.4.4).
* :func:`true_enhanced` - an Enhanced MR Image Storage instance (1.2.840.10008.5.1.4.1.1.4.1)
  written with pydicom the way Siemens XA / Philips export it: geometry only in the per-frame
  Plane Position/Orientation and the shared Pixel Measures groups, TE in the MR Echo and TR in the
  MR Timing sequences, ImageType per frame in the MR Image Frame Type sequence, frames of several
  stacks (any order) or of water and fat images in one instance.
* :func:`write_real_enhanced_study` - MyoSegmenTUM tum01 as one study: a T2-like Enhanced MR
  instance with two stacks (the acquired axial one and one tilted 14 deg, resampled from it, its
  frames first), and the Dixon water and fat frames interleaved in ONE Enhanced MR instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from paraspinal.dicom_series_writer import SeriesInfo, StudyInfo, stack_geometry_from_affine, write_mr_series
from paraspinal.dixon import _sitk_image
from paraspinal.enhanced_mr import ENHANCED_MR_IMAGE_STORAGE
from paraspinal.nifti_to_dicom import dicom_grid, nifti_affine_to_lps, real_case_series

CASE = "myosegmentum_tum01"
TILT_DEG = 14.0


def legacy_converted(datasets: list[Dataset], series_number: int = 3) -> Dataset:
    """One Legacy Converted Enhanced MR instance of ``datasets`` (one classic series), new series UID."""
    return hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
        instance_number=1)


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def true_enhanced(datasets: list[Dataset], *, series_uid: str | None = None, series_number: int = 3,
                  description: str | None = None, frame_types: list[list[str]] | None = None) -> Dataset:
    """An Enhanced MR instance whose frame N is ``datasets[N-1]`` (classic MR of one study and frame
    of reference; their geometry per frame, their TE/TR/spacing taken from the first); FrameType of
    each frame from ``frame_types`` or its ImageType with value 4 ``NONE``."""
    first = datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription",
                    "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer", "ManufacturerModelName",
                    "InstitutionName", "DeviceSerialNumber", "SoftwareVersions", "BodyPartExamined",
                    "PatientPosition", "ProtocolName", "MagneticFieldStrength"):
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description or first.get("SeriesDescription", "")
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = first.StudyDate, first.StudyTime
    ds.AcquisitionDateTime = f"{first.StudyDate}{first.StudyTime}"
    types = frame_types or [list(d.ImageType[:3]) + ["NONE"] for d in datasets]
    ds.ImageType = list(types[0][:2]) + (["MIXED", "MIXED"] if len({tuple(t) for t in types}) > 1 else list(types[0][2:]))
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "MONOCHROME", "VOLUME", "NONE"
    ds.ComplexImageComponent, ds.AcquisitionContrast = "MAGNITUDE", "T2"
    ds.ContentQualification, ds.ResonantNucleus = "RESEARCH", "1H"
    ds.ImagingFrequency = float(first.get("ImagingFrequency", 123.25))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(first.Rows), int(first.Columns)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = len(datasets)
    ds.BurnedInAnnotation, ds.LossyImageCompression, ds.PresentationLUTShape = "NO", "00", "IDENTITY"
    ds.SharedFunctionalGroupsSequence = [_item(
        PixelMeasuresSequence=[_item(PixelSpacing=list(first.PixelSpacing), SliceThickness=first.SliceThickness)],
        MRTimingAndRelatedParametersSequence=[_item(RepetitionTime=float(first.RepetitionTime),
                                                    EchoTrainLength=int(first.get("EchoTrainLength", 1)),
                                                    FlipAngle=float(first.get("FlipAngle", 90)),
                                                    RFEchoTrainLength=1, GradientEchoTrainLength=0)],
        MREchoSequence=[_item(EffectiveEchoTime=float(first.EchoTime))],
        PixelValueTransformationSequence=[_item(RescaleIntercept=first.get("RescaleIntercept", 0),
                                                RescaleSlope=first.get("RescaleSlope", 1), RescaleType="US")],
    )]
    per_frame = []
    for number, (d, frame_type) in enumerate(zip(datasets, types), start=1):
        per_frame.append(_item(
            FrameContentSequence=[_item(FrameAcquisitionNumber=number, InStackPositionNumber=int(d.InstanceNumber),
                                        StackID="1")],
            PlanePositionSequence=[_item(ImagePositionPatient=list(d.ImagePositionPatient))],
            PlaneOrientationSequence=[_item(ImageOrientationPatient=list(d.ImageOrientationPatient))],
            MRImageFrameTypeSequence=[_item(FrameType=list(frame_type), PixelPresentation="MONOCHROME",
                                            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
                                            ComplexImageComponent="MAGNITUDE", AcquisitionContrast="T2")],
        ))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack([d.pixel_array.astype(np.uint16) for d in datasets]).tobytes()
    return ds


def _resample(volume: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape: tuple[int, int, int],
              nearest: bool = False) -> np.ndarray:
    """``volume`` (slice, row, col with its (col, row, slice) -> LPS affine) on another grid."""
    import SimpleITK as sitk

    out = sitk.Resample(_sitk_image(volume, affine), _sitk_image(np.zeros(shape, np.float32), target_affine),
                        sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


@dataclass
class EnhancedStudy:
    """What :func:`write_real_enhanced_study` wrote: per stack the truth labels (slice, row, col)
    in the stack's slice order (ascending along its normal), with that stack's frame numbers."""

    folder: Path
    t2_path: Path
    dixon_path: Path
    t2_series_uid: str
    stack_frames: list[list[int]]  # per stack (ordered by first position z), frame numbers in slice order
    stack_labels: list[np.ndarray]
    pdff_truth: np.ndarray  # on the axial stack, slice order, 0..1


def write_real_enhanced_study(data_dir: Path, folder: Path) -> EnhancedStudy:
    """The tum01 study as two true Enhanced MR instances (module docstring)."""
    study = StudyInfo(patient_name=f"REAL^{CASE}", patient_id=CASE.upper(), accession_number="ENH01",
                      study_description="MRI LUMBAR SPINE")
    classic = folder / "classic"
    case = real_case_series(CASE, classic / "axial", study=study, data_dir=data_dir)
    axial = [pydicom.dcmread(p) for p in case.paths]
    # The tilted stack: 12 slices, 6 mm apart, rotated 14 deg about the patient's left-right axis
    # around the volume centre, resampled from the axial volume (labels by nearest neighbour).
    angle = np.radians(TILT_DEG)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    n, rows, cols = case.pixels.shape
    centre = case.affine_lps @ np.array([(cols - 1) / 2, (rows - 1) / 2, (n - 1) / 2, 1.0])
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    tilted_affine = back @ rotation @ shift @ case.affine_lps
    tilted_affine[:3, 2] *= 6.0 / np.linalg.norm(tilted_affine[:3, 2])
    tilted_affine[:3, 3] = centre[:3] - tilted_affine[:3, :3] @ np.array([(cols - 1) / 2, (rows - 1) / 2, 5.5])
    shape = (12, rows, cols)
    tilted_pixels = np.rint(_resample(case.pixels.astype(np.float32), case.affine_lps, tilted_affine, shape))
    tilted_labels = _resample(case.labels.astype(np.float32), case.affine_lps, tilted_affine, shape, nearest=True)
    tilted_files = write_mr_series(tilted_pixels.astype(np.uint16),
                                   stack_geometry_from_affine(tilted_affine, 12, rows=rows, cols=cols),
                                   classic / "tilted", study=study, series=SeriesInfo(series_number=99))
    tilted = [pydicom.dcmread(p) for p in tilted_files]
    for d in tilted:  # the tilted stack shares the axial series' scale (both are one acquisition here)
        d.RescaleSlope, d.RescaleIntercept = axial[0].get("RescaleSlope", 1), axial[0].get("RescaleIntercept", 0)
    t2 = true_enhanced(tilted + axial, series_number=3, description="t2_tse_tra_enhanced")
    t2_path = folder / "in" / "t2_enhanced.dcm"
    t2_path.parent.mkdir(parents=True, exist_ok=True)
    t2.save_as(t2_path, enforce_file_format=True)

    water = np.asarray(nib.load(str(data_dir / f"{CASE}_water.nii.gz")).dataobj, dtype=np.float64)
    fat = np.asarray(nib.load(str(data_dir / f"{CASE}_fat.nii.gz")).dataobj, dtype=np.float64)
    scale = np.floor(65000.0 / max(water.max(), fat.max()))
    affine = nifti_affine_to_lps(nib.load(str(data_dir / f"{CASE}_water.nii.gz")).affine)
    geometry = stack_geometry_from_affine(affine, water.shape[2], rows=water.shape[1], cols=water.shape[0])
    frames, types = [], []
    for kind, volume in (("WATER", water), ("FAT", fat)):
        info = SeriesInfo(series_number=10, image_type=("DERIVED", "PRIMARY", "DIXON", kind), echo_time=2.46,
                          repetition_time=6.0, echo_train_length=1, flip_angle=3.0, mr_acquisition_type="3D")
        files = write_mr_series(dicom_grid(np.rint(volume * scale)), geometry, classic / kind.lower(),
                                study=study, series=info)
        frames.append([pydicom.dcmread(p) for p in files])
    interleaved = [d for pair in zip(*frames) for d in pair]  # W1 F1 W2 F2 ...: told apart only per frame
    types = [["DERIVED", "PRIMARY", "VOLUME", "WATER"], ["DERIVED", "PRIMARY", "VOLUME", "FAT"]] * len(frames[0])
    dixon = true_enhanced(interleaved, series_number=10, description="dixon_tra", frame_types=types)
    dixon_path = folder / "in" / "dixon_enhanced.dcm"
    dixon.save_as(dixon_path, enforce_file_format=True)

    # Stack order: by the first slice's z (stacks.plan_stacks); slices ascending along each normal.
    def along_normal(datasets):
        normal = np.cross(np.asarray(datasets[0].ImageOrientationPatient[:3], float),
                          np.asarray(datasets[0].ImageOrientationPatient[3:], float))
        return sorted(range(len(datasets)), key=lambda i: float(np.dot(datasets[i].ImagePositionPatient, normal)))

    stacks = []
    for offset, datasets, labels in ((0, tilted, tilted_labels), (len(tilted), axial, case.labels)):
        order = along_normal(datasets)
        stacks.append((float(datasets[order[0]].ImagePositionPatient[2]), [offset + i + 1 for i in order],
                       np.stack([labels[i] for i in order]).astype(np.uint8),
                       order if offset else None))
    stacks.sort(key=lambda s: s[0])
    axial_order = along_normal(axial)
    return EnhancedStudy(folder=folder / "in", t2_path=t2_path, dixon_path=dixon_path,
                         t2_series_uid=str(t2.SeriesInstanceUID), stack_frames=[s[1] for s in stacks],
                         stack_labels=[s[2] for s in stacks],
                         pdff_truth=np.stack([case.pdff[i] for i in axial_order]))
