"""Write a volume as a single-frame MR Image Storage series with exact geometry.

Coordinates: DICOM patient LPS in mm (x towards the patient's left, y posterior,
z head). Volumes are indexed (slice, row, col). Following DICOM, the first
ImageOrientationPatient triplet (the "row direction") is the direction in which
the column index increases, the second triplet the direction in which the row
index increases, and PixelSpacing is (spacing between rows, spacing between
columns). Affines follow the convention of :mod:`paraspinal.stacks` and NIfTI:
they map the index (col, row, slice, 1) = (i, j, k, 1) to LPS mm.

Used by the demo, the tests and model training to produce DICOM input whose
geometry is known exactly; every transfer syntax written is lossless.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat

__all__ = [
    "TRANSFER_SYNTAXES",
    "StudyInfo",
    "SeriesInfo",
    "StackGeometry",
    "SliceGeometry",
    "axial_stack_geometry",
    "oriented_stack_geometry",
    "stack_geometry_from_affine",
    "geometry_from_datasets",
    "write_mr_series",
]

#: Names accepted by ``transfer_syntax`` and the UID each one writes.
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit_little": ExplicitVRLittleEndian,
    "implicit_little": ImplicitVRLittleEndian,
    "jpeg_lossless": JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70, encoded by DCMTK dcmcjpeg
    "jpeg_ls": JPEGLSLossless,  # 1.2.840.10008.1.2.4.80, pyjpegls
    "jpeg2000_lossless": JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90, pylibjpeg-openjpeg
    "rle": RLELossless,  # 1.2.840.10008.1.2.5, pydicom native encoder
    "deflate": DeflatedExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1.99
}


@dataclass
class StudyInfo:
    """Patient and study level attributes shared by every series of one synthetic study.

    The frame of reference is study level here because all series of one
    synthetic session share the patient position (same LPS origin).
    """

    patient_name: str = "PHANTOM^LUMBAR"
    patient_id: str = "PHANTOM0001"
    patient_birth_date: str = "19700101"
    patient_sex: str = "O"
    patient_age: str = "054Y"
    study_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_date: str = "20240101"
    study_time: str = "120000"
    accession_number: str = "SYN0001"
    referring_physician_name: str = "REFERRER^SYNTHETIC"
    study_id: str = "1"
    study_description: str = "MRI LUMBAR SPINE"
    institution_name: str = "Synthetic Imaging Centre"
    manufacturer: str = "SYNTHETIC"
    manufacturer_model_name: str = "PHANTOM MR"
    device_serial_number: str = "0001"
    software_versions: str = "paraspinal.synthetic"
    station_name: str = "SYNMR01"


@dataclass
class SeriesInfo:
    """Series and acquisition attributes of one MR series (times in ms, field in T)."""

    series_instance_uid: str = field(default_factory=generate_uid)
    series_number: int = 1
    series_description: str = "t2_tse_tra"
    protocol_name: str = "t2_tse_tra"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "NORM")
    echo_time: float = 100.0
    repetition_time: float = 4000.0
    echo_train_length: int = 15
    flip_angle: float = 150.0
    scanning_sequence: tuple[str, ...] = ("SE",)
    sequence_variant: tuple[str, ...] = ("SK", "SP", "OSP")
    scan_options: tuple[str, ...] = ()
    mr_acquisition_type: str = "2D"
    sequence_name: str = "*tse2d1_15"
    magnetic_field_strength: float = 3.0
    imaging_frequency: float = 123.25
    pixel_bandwidth: float = 200.0
    body_part_examined: str = "LSPINE"
    patient_position: str = "HFS"
    position_reference_indicator: str = ""
    acquisition_number: int = 1
    # None: computed from the written pixels (1st..99th percentile).
    window_center: float | None = None
    window_width: float | None = None
    # None: the study's frame of reference.
    frame_of_reference_uid: str | None = None


@dataclass(frozen=True)
class StackGeometry:
    """Geometry of the slices of one series, in LPS patient mm.

    ``positions``: (n, 3) ImagePositionPatient of each slice (centre of the first
    transmitted pixel). ``orientations``: (n, 6) ImageOrientationPatient of each
    slice (a single (6,) value is broadcast; multi-stack series differ per slice).
    ``pixel_spacing``: (row spacing, column spacing) mm, DICOM order.
    """

    positions: np.ndarray
    orientations: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    spacing_between_slices: float | None = None
    rows: int | None = None  # matrix size, when known (needed to render, checked when writing)
    cols: int | None = None

    def __post_init__(self) -> None:
        pos = np.atleast_2d(np.asarray(self.positions, dtype=np.float64))
        ori = np.asarray(self.orientations, dtype=np.float64)
        if ori.ndim == 1:
            ori = np.broadcast_to(ori, (pos.shape[0], 6))
        ori = np.array(ori, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[1] != 3 or ori.shape != (pos.shape[0], 6):
            raise ValueError(f"positions must be (n, 3) and orientations (n, 6); got {pos.shape} and {ori.shape}")
        row, col = ori[:, :3], ori[:, 3:]
        if not (np.allclose(np.linalg.norm(row, axis=1), 1, atol=1e-4) and np.allclose(np.linalg.norm(col, axis=1), 1, atol=1e-4)):
            raise ValueError("orientation direction cosines must be unit vectors")
        if np.abs(np.einsum("ij,ij->i", row, col)).max() > 1e-4:
            raise ValueError("row and column direction cosines must be orthogonal")
        spacing = tuple(float(v) for v in self.pixel_spacing)
        if len(spacing) != 2 or min(spacing) <= 0 or self.slice_thickness <= 0:
            raise ValueError("pixel spacing and slice thickness must be positive")
        object.__setattr__(self, "positions", pos)
        object.__setattr__(self, "orientations", ori)
        object.__setattr__(self, "pixel_spacing", spacing)
        object.__setattr__(self, "slice_thickness", float(self.slice_thickness))

    @property
    def n_slices(self) -> int:
        return int(self.positions.shape[0])

    @property
    def row_directions(self) -> np.ndarray:
        """(n, 3) unit vectors along which the column index increases."""
        return self.orientations[:, :3]

    @property
    def column_directions(self) -> np.ndarray:
        """(n, 3) unit vectors along which the row index increases."""
        return self.orientations[:, 3:]

    @property
    def normals(self) -> np.ndarray:
        """(n, 3) slice normals, row direction x column direction."""
        return np.cross(self.row_directions, self.column_directions)

    def index_to_lps(self, slice_index: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """LPS mm of (integer slice, fractional row, fractional col) indices; broadcasts, returns (..., 3)."""
        k = np.asarray(slice_index, dtype=np.intp)
        r = np.asarray(row, dtype=np.float64)[..., None]
        c = np.asarray(col, dtype=np.float64)[..., None]
        rs, cs = self.pixel_spacing
        return self.positions[k] + c * cs * self.row_directions[k] + r * rs * self.column_directions[k]

    def voxel_centres(self, rows: int | None = None, cols: int | None = None) -> np.ndarray:
        """(n, rows, cols, 3) LPS mm of every voxel centre (matrix size defaults to the geometry's)."""
        rows = rows if rows is not None else self.rows
        cols = cols if cols is not None else self.cols
        if rows is None or cols is None:
            raise ValueError("matrix size unknown: pass rows and cols")
        k, r, c = np.meshgrid(np.arange(self.n_slices), np.arange(rows), np.arange(cols), indexing="ij")
        return self.index_to_lps(k, r, c)

    def affine_lps(self) -> np.ndarray:
        """4x4 affine mapping (col, row, slice, 1) to LPS mm.

        Only defined for a single stack (one orientation, evenly spaced positions
        on a line); raises ValueError otherwise.
        """
        if not np.allclose(self.orientations, self.orientations[0], atol=1e-6):
            raise ValueError("geometry has more than one orientation; split it into stacks first")
        steps = np.diff(self.positions, axis=0)
        step = steps.mean(axis=0) if len(steps) else self.normals[0] * self.slice_thickness
        if len(steps) and not np.allclose(steps, step, atol=1e-3):
            raise ValueError("slice positions are not evenly spaced on a line")
        rs, cs = self.pixel_spacing
        affine = np.eye(4)
        affine[:3, 0] = self.row_directions[0] * cs
        affine[:3, 1] = self.column_directions[0] * rs
        affine[:3, 2] = step
        affine[:3, 3] = self.positions[0]
        return affine

    def subset(self, indices: Sequence[int] | slice) -> StackGeometry:
        """Geometry of the selected slices (e.g. one stack of a multi-stack series)."""
        return StackGeometry(self.positions[indices], self.orientations[indices], self.pixel_spacing,
                             self.slice_thickness, self.spacing_between_slices, self.rows, self.cols)

    @staticmethod
    def concatenate(parts: Sequence[StackGeometry]) -> StackGeometry:
        """One geometry for a series made of several stacks, slices in the given order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if (not np.allclose(p.pixel_spacing, first.pixel_spacing) or not np.isclose(p.slice_thickness, first.slice_thickness)
                    or (p.rows, p.cols) != (first.rows, first.cols)):
                raise ValueError("stacks of one series must share PixelSpacing, SliceThickness and matrix size")
        gaps = {p.spacing_between_slices for p in parts}
        return StackGeometry(np.concatenate([p.positions for p in parts]), np.concatenate([p.orientations for p in parts]),
                             first.pixel_spacing, first.slice_thickness, gaps.pop() if len(gaps) == 1 else None,
                             first.rows, first.cols)


#: The brief's alternative name; one class serves both.
SliceGeometry = StackGeometry


def oriented_stack_geometry(row_direction: Sequence[float], column_direction: Sequence[float], n_slices: int, rows: int,
                            cols: int, pixel_spacing: tuple[float, float], slice_spacing: float, *,
                            centre_lps: Sequence[float] = (0.0, 0.0, 0.0), slice_direction: Sequence[float] | None = None,
                            slice_thickness: float | None = None) -> StackGeometry:
    """A regular stack of any orientation centred at ``centre_lps`` (LPS mm).

    ``row_direction``/``column_direction``: IOP triplets (normalised here).
    ``slice_direction``: direction of increasing slice index, default the normal
    (row x column); may point against the normal (reversed slice order).
    """
    row = np.asarray(row_direction, dtype=np.float64)
    row /= np.linalg.norm(row)
    col = np.asarray(column_direction, dtype=np.float64)
    col -= row * np.dot(row, col)  # tolerate rounding in the caller's cosines
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    step_dir = normal if slice_direction is None else np.asarray(slice_direction, dtype=np.float64)
    step_dir = step_dir / np.linalg.norm(step_dir)
    rs, cs = (float(v) for v in pixel_spacing)
    centre = np.asarray(centre_lps, dtype=np.float64)
    first = centre - (cols - 1) / 2 * cs * row - (rows - 1) / 2 * rs * col - (n_slices - 1) / 2 * slice_spacing * step_dir
    positions = first + np.arange(n_slices)[:, None] * slice_spacing * step_dir
    return StackGeometry(positions, np.concatenate([row, col]), (rs, cs),
                         float(slice_thickness if slice_thickness is not None else slice_spacing),
                         float(abs(slice_spacing * np.dot(step_dir, normal))), int(rows), int(cols))


def axial_stack_geometry(n_slices: int, rows: int, cols: int, pixel_spacing: tuple[float, float], slice_spacing: float,
                         origin_lps: Sequence[float] = (0.0, 0.0, 0.0), tilt_deg_about_lr: float = 0.0,
                         flip_rows: bool = False, flip_cols: bool = False, reverse_slice_order: bool = False,
                         slice_thickness: float | None = None) -> StackGeometry:
    """An axial stack centred at ``origin_lps`` (LPS mm of the centre of the middle slice).

    Standard orientation: columns increase to the patient's left (+x), rows
    posteriorly (+y), slices towards the head (+z). ``tilt_deg_about_lr`` rotates
    the stack right-handedly about the patient's left-right (x) axis, as for
    disc-angled stacks: the column direction becomes (0, cos t, sin t) and the
    slice normal (0, -sin t, cos t), so positive angles tip the normal from the
    head towards anterior. ``flip_rows``: rows
    increase anteriorly; ``flip_cols``: columns increase to the patient's right;
    ``reverse_slice_order``: slices go towards the feet.
    """
    t = np.deg2rad(tilt_deg_about_lr)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), np.sin(t)])
    up = np.array([0.0, -np.sin(t), np.cos(t)])  # tilted head direction
    if flip_cols:
        row = -row
    if flip_rows:
        col = -col
    return oriented_stack_geometry(row, col, n_slices, rows, cols, pixel_spacing, slice_spacing, centre_lps=origin_lps,
                                   slice_direction=-up if reverse_slice_order else up, slice_thickness=slice_thickness)


def stack_geometry_from_affine(affine_lps: np.ndarray, n_slices: int, slice_thickness: float | None = None, *,
                               rows: int | None = None, cols: int | None = None) -> StackGeometry:
    """Geometry of a regular stack from a 4x4 affine mapping (col, row, slice, 1) to LPS mm.

    Columns 0 and 1 of the affine must be orthogonal (DICOM cannot express
    in-plane shear); the slice step (column 2) may be oblique to the plane.
    ``slice_thickness`` defaults to the slice step projected on the normal.
    """
    a = np.asarray(affine_lps, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape}")
    cs, rs = np.linalg.norm(a[:3, 0]), np.linalg.norm(a[:3, 1])
    row, col = a[:3, 0] / cs, a[:3, 1] / rs
    if abs(np.dot(row, col)) > 1e-4:
        raise ValueError("affine has in-plane shear; DICOM row and column directions must be orthogonal")
    normal = np.cross(row, col)
    gap = float(abs(np.dot(a[:3, 2], normal)))
    positions = a[:3, 3] + np.arange(n_slices)[:, None] * a[:3, 2]
    return StackGeometry(positions, np.concatenate([row, col]), (float(rs), float(cs)),
                         float(slice_thickness if slice_thickness is not None else gap), gap, rows, cols)


def geometry_from_datasets(datasets: Sequence[Dataset]) -> StackGeometry:
    """Rebuild the geometry of instances (in the given order) from IPP, IOP and PixelSpacing."""
    pos = [[float(v) for v in ds.ImagePositionPatient] for ds in datasets]
    ori = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    ori[:, :3] /= np.linalg.norm(ori[:, :3], axis=1, keepdims=True)
    ori[:, 3:] /= np.linalg.norm(ori[:, 3:], axis=1, keepdims=True)
    first = datasets[0]
    gap = first.get("SpacingBetweenSlices")
    return StackGeometry(np.array(pos), ori, tuple(float(v) for v in first.PixelSpacing),
                         float(first.get("SliceThickness") or 1.0), float(gap) if gap is not None else None,
                         int(first.Rows), int(first.Columns))


def _ds(value: float) -> DSfloat:
    """A DS value of at most 16 characters, as precise as that allows (no "-0.0", no 1e-17 noise)."""
    return DSfloat(round(float(value), 12) + 0.0, auto_format=True)


def _bits_stored(max_value: int) -> int:
    return int(min(16, max(12, int(max_value).bit_length())))


def _window(volume: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(volume, [1.0, 99.0]) if volume.size else (0.0, 1.0)
    return float(round((lo + hi) / 2)), float(max(1.0, round(hi - lo)))


def _base_dataset(study: StudyInfo, series: SeriesInfo, now: _dt.datetime) -> Dataset:
    """Attributes identical in every instance of the series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = MRImageStorage
    # Patient / study
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.PatientAge = study.patient_age
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.StudyID = study.study_id
    ds.StudyDescription = study.study_description
    # Series / equipment / frame of reference
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = int(series.series_number)
    ds.SeriesDescription = series.series_description
    ds.ProtocolName = series.protocol_name
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    ds.BodyPartExamined = series.body_part_examined
    ds.PatientPosition = series.patient_position
    ds.Manufacturer = study.manufacturer
    ds.ManufacturerModelName = study.manufacturer_model_name
    ds.DeviceSerialNumber = study.device_serial_number
    ds.SoftwareVersions = study.software_versions
    ds.StationName = study.station_name
    ds.InstitutionName = study.institution_name
    ds.FrameOfReferenceUID = series.frame_of_reference_uid or study.frame_of_reference_uid
    ds.PositionReferenceIndicator = series.position_reference_indicator
    # MR image module
    ds.ImageType = list(series.image_type)
    ds.ScanningSequence = list(series.scanning_sequence)
    ds.SequenceVariant = list(series.sequence_variant)
    ds.ScanOptions = list(series.scan_options) if series.scan_options else ""
    ds.MRAcquisitionType = series.mr_acquisition_type
    ds.SequenceName = series.sequence_name
    ds.AngioFlag = "N"
    ds.RepetitionTime = _ds(series.repetition_time)
    ds.EchoTime = _ds(series.echo_time)
    ds.EchoTrainLength = int(series.echo_train_length)
    ds.NumberOfAverages = _ds(1)
    ds.ImagingFrequency = _ds(series.imaging_frequency)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.MagneticFieldStrength = _ds(series.magnetic_field_strength)
    ds.PixelBandwidth = _ds(series.pixel_bandwidth)
    ds.FlipAngle = _ds(series.flip_angle)
    ds.AcquisitionNumber = int(series.acquisition_number)
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = study.study_time
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    # Image pixel module: unsigned 16-bit greyscale
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    return ds


def _encode_jpeg_lossless(path: Path) -> None:
    """Re-encode ``path`` in place as JPEG Lossless SV1 with DCMTK (pydicom has no encoder for it)."""
    exe = shutil.which("dcmcjpeg")
    if exe is None:
        raise RuntimeError("transfer syntax 'jpeg_lossless' needs DCMTK's dcmcjpeg on PATH")
    tmp = path.with_name(path.name + ".jpl")
    # +e1: lossless selection value 1; +un: keep the SOP Instance UID (lossless, same image).
    result = subprocess.run([exe, "+e1", "+un", str(path), str(tmp)], capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"dcmcjpeg failed on {path}: {result.stderr.strip() or result.stdout.strip()}")
    tmp.replace(path)


def write_mr_series(volume: np.ndarray, geometry: StackGeometry, out_dir: str | Path, *, study: StudyInfo,
                    series: SeriesInfo, transfer_syntax: str = "explicit_little", start_instance: int = 1,
                    sop_instance_uids: Sequence[str] | None = None) -> list[Path]:
    """Write ``volume`` (slice, row, col), one MR Image Storage file per slice, into ``out_dir``.

    Pixel values must be non-negative integers below 65536 (floats are rounded);
    they are stored as uint16 MONOCHROME2 with BitsStored 12..16 as needed. Slice
    ``k`` gets the geometry of ``geometry`` slice ``k`` and InstanceNumber
    ``start_instance + k``. ``sop_instance_uids`` lets the caller fix the UIDs
    (fresh ones otherwise). Returns the file paths in slice order; files are
    named ``IM_<series>_<instance>.dcm``.
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer_syntax {transfer_syntax!r}; choose from {sorted(TRANSFER_SYNTAXES)}")
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3-D (slice, row, col), got shape {vol.shape}")
    if vol.shape[0] != geometry.n_slices:
        raise ValueError(f"volume has {vol.shape[0]} slices but geometry has {geometry.n_slices}")
    if geometry.rows is not None and geometry.cols is not None and vol.shape[1:] != (geometry.rows, geometry.cols):
        raise ValueError(f"volume slices are {vol.shape[1:]} but the geometry is {geometry.rows}x{geometry.cols}")
    if not np.all(np.isfinite(vol)) or vol.min(initial=0) < 0 or vol.max(initial=0) > 65535:
        raise ValueError("pixel values must be finite and within 0..65535")
    if transfer_syntax == "jpeg2000_lossless" and min(vol.shape[1:]) < 32:
        # openjpeg's encoder always uses 6 DWT resolutions, which need at least 32 pixels per side.
        raise ValueError("jpeg2000_lossless needs images of at least 32 x 32 pixels")
    pixels = np.rint(vol).astype(np.uint16) if vol.dtype.kind == "f" else vol.astype(np.uint16)
    uids = list(sop_instance_uids) if sop_instance_uids is not None else [generate_uid() for _ in range(vol.shape[0])]
    if len(uids) != vol.shape[0]:
        raise ValueError("one SOP Instance UID per slice is needed")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now()
    base = _base_dataset(study, series, now)
    bits = _bits_stored(int(pixels.max(initial=0)))
    centre, width = _window(pixels)
    if series.window_center is not None and series.window_width is not None:
        centre, width = float(series.window_center), float(series.window_width)
    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
    rs, cs = geometry.pixel_spacing
    paths: list[Path] = []
    for k in range(vol.shape[0]):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = uids[k]
        ds.InstanceNumber = int(start_instance + k)
        ds.ImagePositionPatient = [_ds(v) for v in geometry.positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientations[k]]
        ds.PixelSpacing = [_ds(rs), _ds(cs)]
        ds.SliceThickness = _ds(geometry.slice_thickness)
        if geometry.spacing_between_slices is not None:
            ds.SpacingBetweenSlices = _ds(geometry.spacing_between_slices)
        # Conventional SliceLocation: signed distance of the slice along its normal.
        ds.SliceLocation = _ds(round(float(np.dot(geometry.positions[k], geometry.normals[k])), 4))
        ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        ds.BitsStored, ds.HighBit = bits, bits - 1
        ds.WindowCenter, ds.WindowWidth = _ds(centre), _ds(width)
        ds.WindowCenterWidthExplanation = "NORMAL"
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        if transfer_syntax in ("jpeg_ls", "jpeg2000_lossless", "rle"):
            ds.compress(ts_uid, pixels[k], generate_instance_uid=False)
        elif transfer_syntax in ("implicit_little", "deflate"):
            meta.TransferSyntaxUID = ts_uid  # pydicom encodes (and deflates) on write

        path = out / f"IM_{int(series.series_number):04d}_{int(start_instance + k):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if transfer_syntax == "jpeg_lossless":
            _encode_jpeg_lossless(path)
        paths.append(path)
    return paths
