"""Real NIfTI volumes written as DICOM MR series with their true geometry.

NIfTI affines map the voxel index (i, j, k) to RAS world mm; DICOM uses LPS
(x and y negated). The series gets one slice per index k, and within a slice
DICOM row r / column c is NIfTI voxel (i=c, j=r, k). So the DICOM pixel array
of the series, indexed (slice, row, col), is the NIfTI array transposed
(2, 1, 0), and IPP/IOP/PixelSpacing map every pixel onto the LPS point the
NIfTI affine gives for that voxel (RAS -> LPS).

The real fixtures live in ``../shared/data/real`` relative to the project root
(see its README): laterality is taken from the affine (voxel axis 0 of these
files points to the patient's left), never from the array order.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from paraspinal.dicom_series_writer import SeriesInfo, StackGeometry, StudyInfo, stack_geometry_from_affine, write_mr_series
from paraspinal.phantom import LABEL_NAMES

__all__ = [
    "RAS_TO_LPS",
    "DEFAULT_REAL_DATA_DIR",
    "REAL_CASES",
    "RealCase",
    "nifti_affine_to_lps",
    "to_uint16",
    "nifti_to_dicom_series",
    "real_case_series",
]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: The shared real fixtures: ``../shared/data/real`` beside the project, or ``$PARASPINAL_REAL_DATA``
#: (a checkout elsewhere, a site's copy). The one definition; training and the tests use it too.
DEFAULT_REAL_DATA_DIR = Path(os.environ.get("PARASPINAL_REAL_DATA",
                                            Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
REAL_CASES = ("musclemap_sub0001", "myosegmentum_tum01")
# MyoSegmenTUM labels (1 ES R, 2 MF R, 3 MF L, 4 ES L) -> the project's labels (paraspinal.phantom.LABEL_NAMES).
_MYOSEGMENTUM_TO_PROJECT = {1: 3, 2: 1, 3: 2, 4: 4}
_FLOAT_FULL_SCALE = 4095  # floats are scaled into 12 bits: enough precision, small files


@dataclass
class RealCase:
    """A real fixture written as DICOM; arrays are (slice, row, col) in the DICOM grid."""

    name: str
    paths: list[Path]  # slice order
    pixels: np.ndarray  # uint16, exactly the written pixels
    labels: np.ndarray  # uint8, project labels (1 multifidus R .. 8 quadratus lumborum L)
    label_names: dict[int, str]  # the project labels this case's reference segmentation contains
    geometry: StackGeometry
    affine_lps: np.ndarray  # 4x4, (col, row, slice, 1) -> LPS mm
    study_uid: str
    series_uid: str
    pdff: np.ndarray | None = None  # proton-density fat fraction 0..1, Dixon cases only


def nifti_affine_to_lps(affine_ras: np.ndarray) -> np.ndarray:
    """The same voxel -> world mapping with the world in DICOM LPS instead of NIfTI RAS."""
    return RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)


def to_uint16(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(pixels, slope, intercept) with ``data ~ pixels * slope + intercept``.

    Integer data within 0..65535 are kept exactly (slope 1, intercept 0). Float
    data, or integers out of range, are mapped linearly so that min(0, data.min())
    becomes 0 and data.max() becomes 4095 (zero stays zero for non-negative data).
    """
    arr = np.asarray(data)
    if not np.all(np.isfinite(arr)):
        raise ValueError("image contains NaN or infinite values")
    if arr.dtype.kind in "ui" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        return arr.astype(np.uint16), 1.0, 0.0
    lo = float(min(0.0, arr.min(initial=0)))
    hi = float(arr.max(initial=0))
    slope = (hi - lo) / _FLOAT_FULL_SCALE if hi > lo else 1.0
    pixels = np.clip(np.rint((arr - lo) / slope), 0, _FLOAT_FULL_SCALE).astype(np.uint16)
    return pixels, slope, lo


def _load(nifti: str | Path | nib.spatialimages.SpatialImage) -> nib.spatialimages.SpatialImage:
    return nifti if isinstance(nifti, nib.spatialimages.SpatialImage) else nib.load(str(nifti))


def _volume(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {data.shape}")
    return data


def dicom_grid(volume_ijk: np.ndarray) -> np.ndarray:
    """A NIfTI-ordered (i, j, k) array reordered to the DICOM (slice, row, col) grid."""
    return np.ascontiguousarray(np.asarray(volume_ijk).transpose(2, 1, 0))


def nifti_to_dicom_series(nifti: str | Path | nib.spatialimages.SpatialImage, out_dir: str | Path, *,
                          study: StudyInfo | None = None, series: SeriesInfo | None = None,
                          transfer_syntax: str = "explicit_little") -> list[Path]:
    """Write a 3-D NIfTI image (path or nibabel image) as one MR series, slice k = voxel plane k.

    Geometry comes from the NIfTI affine (RAS) converted to LPS; float images are
    scaled into uint16 (see :func:`to_uint16`). Returns the file paths in slice order.
    """
    img = _load(nifti)
    pixels, _, _ = to_uint16(_volume(img))
    ni, nj, nk = pixels.shape
    geometry = stack_geometry_from_affine(nifti_affine_to_lps(img.affine), nk, rows=nj, cols=ni)
    return write_mr_series(dicom_grid(pixels), geometry, out_dir, study=study or StudyInfo(),
                           series=series or SeriesInfo(), transfer_syntax=transfer_syntax)


def real_case_series(name: str, out_dir: str | Path, *, transfer_syntax: str = "explicit_little",
                     study: StudyInfo | None = None, series: SeriesInfo | None = None,
                     data_dir: str | Path | None = None) -> RealCase:
    """Write a real fixture as a DICOM series and return it with its labels in the DICOM grid.

    ``"musclemap_sub0001"``: the axial TSE image with its 8-muscle reference
    segmentation. ``"myosegmentum_tum01"``: water + fat of the Dixon acquisition
    (an in-phase-like image in which fat is bright, as on T2 TSE), with the
    manual erector spinae / multifidus masks remapped to the project's labels
    and the PDFF fat / (water + fat). The MyoSegmenTUM fat file carries a
    different origin from the water and label files; the water/label affine is used.
    """
    root = Path(data_dir) if data_dir is not None else DEFAULT_REAL_DATA_DIR
    if name == "musclemap_sub0001":
        image = nib.load(str(root / "musclemap_sub0001_image.nii.gz"))
        seg = nib.load(str(root / "musclemap_sub0001_dseg.nii.gz"))
        source_labels = _volume(seg).astype(np.int64)
        labels = source_labels.astype(np.uint8)
        pdff = None
        description = "t2_tse_tra"
    elif name == "myosegmentum_tum01":
        water_img = nib.load(str(root / "myosegmentum_tum01_water.nii.gz"))
        water = _volume(water_img).astype(np.float64)
        fat = _volume(nib.load(str(root / "myosegmentum_tum01_fat.nii.gz"))).astype(np.float64)
        total = water + fat
        image = nib.Nifti1Image(total, water_img.affine)
        seg = nib.load(str(root / "myosegmentum_tum01_label.nii.gz"))
        source_labels = _volume(seg).astype(np.int64)
        labels = np.zeros(source_labels.shape, dtype=np.uint8)
        for src, dst in _MYOSEGMENTUM_TO_PROJECT.items():
            labels[source_labels == src] = dst
        with np.errstate(invalid="ignore", divide="ignore"):
            pdff = np.where(total > 0, fat / np.where(total > 0, total, 1.0), 0.0).astype(np.float32)
        # Avoids the selector's description tie-breaker words ("dixon", "fat", "water"): it stands in for a T2.
        description = "t2like_tra_WplusF"
    else:
        raise ValueError(f"unknown real case {name!r}; choose from {REAL_CASES}")
    if not np.allclose(seg.affine, image.affine, atol=1e-3) or seg.shape[:3] != image.shape[:3]:
        raise ValueError(f"{name}: label and image grids differ")

    study = study or StudyInfo(patient_name=f"REAL^{name}", patient_id=name.upper(), accession_number=name[:16],
                               study_description="MRI LUMBAR SPINE")
    series = series or SeriesInfo(series_number=3, series_description=description, protocol_name=description)
    paths = nifti_to_dicom_series(image, out_dir, study=study, series=series, transfer_syntax=transfer_syntax)
    pixels, _, _ = to_uint16(_volume(image))
    affine_lps = nifti_affine_to_lps(image.affine)
    present = sorted(int(v) for v in np.unique(labels) if v)
    return RealCase(name=name, paths=paths, pixels=dicom_grid(pixels), labels=dicom_grid(labels),
                    label_names={v: LABEL_NAMES[v] for v in present},
                    geometry=stack_geometry_from_affine(affine_lps, image.shape[2], rows=image.shape[1], cols=image.shape[0]),
                    affine_lps=affine_lps, study_uid=study.study_instance_uid, series_uid=series.series_instance_uid,
                    pdff=dicom_grid(pdff) if pdff is not None else None)
