"""NIfTI (RAS) -> DICOM (LPS) series: voxel-for-voxel geometry, pixel values and laterality.

The real fixtures are read from ../shared/data/real (see its README); tests that need
them are skipped where they are absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
from nibabel.eulerangles import euler2mat
import numpy as np
import pydicom
import pytest

from paraspinal.dicom_series_writer import SeriesInfo, StudyInfo, geometry_from_datasets
from paraspinal.nifti_to_dicom import (
    DEFAULT_REAL_DATA_DIR,
    dicom_grid,
    nifti_affine_to_lps,
    nifti_to_dicom_series,
    real_case_series,
    to_uint16,
)

needs_real_data = pytest.mark.skipif(not (DEFAULT_REAL_DATA_DIR / "musclemap_sub0001_image.nii.gz").exists(),
                                     reason="real fixtures not available")


def read_series(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def voxel_to_lps_from_files(datasets: list[pydicom.Dataset], i: int, j: int, k: int) -> np.ndarray:
    """LPS mm of NIfTI voxel (i, j, k) = DICOM slice k, row j, column i, from the files' IPP/IOP/PixelSpacing only."""
    ds = datasets[k]
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return ipp + i * col_spacing * iop[:3] + j * row_spacing * iop[3:]


def test_float_nifti_with_oblique_affine_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.uniform(-5.0, 300.0, size=(12, 10, 4))
    rotation = euler2mat(0.3, 0.0, 0.2)  # oblique plane
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.1, 3.5])
    affine[:3, 3] = (40.0, -20.0, 7.0)
    path = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    paths = nifti_to_dicom_series(path, tmp_path / "dicom", study=StudyInfo(), series=SeriesInfo())
    datasets = read_series(paths)
    assert len(paths) == 4 and (datasets[0].Rows, datasets[0].Columns) == (10, 12)
    pixels, slope, intercept = to_uint16(data)
    assert intercept == data.min() < 0 and pixels.max() == 4095
    np.testing.assert_allclose(pixels * slope + intercept, data, atol=slope / 2 + 1e-9)  # scaled, not clipped
    np.testing.assert_array_equal(np.stack([ds.pixel_array for ds in datasets]), dicom_grid(pixels))
    lps = nifti_affine_to_lps(affine)
    for i, j, k in [(0, 0, 0), (11, 9, 3), (5, 2, 1)]:
        np.testing.assert_allclose(voxel_to_lps_from_files(datasets, i, j, k), (lps @ [i, j, k, 1])[:3], atol=1e-6)


@needs_real_data
def test_musclemap_round_trip_geometry_pixels_and_laterality(tmp_path: Path) -> None:
    case = real_case_series("musclemap_sub0001", tmp_path, transfer_syntax="rle")
    image = nib.load(str(DEFAULT_REAL_DATA_DIR / "musclemap_sub0001_image.nii.gz"))
    seg = nib.load(str(DEFAULT_REAL_DATA_DIR / "musclemap_sub0001_dseg.nii.gz"))
    labels_ijk = np.asanyarray(seg.dataobj)
    datasets = read_series(case.paths)

    # Pixels: the decoded series is the NIfTI array, reordered (i, j, k) -> (slice=k, row=j, col=i).
    np.testing.assert_array_equal(np.stack([ds.pixel_array for ds in datasets]), np.asanyarray(image.dataobj).transpose(2, 1, 0))
    np.testing.assert_array_equal(case.labels, labels_ijk.transpose(2, 1, 0))

    # Geometry: labelled voxels land on the NIfTI affine's point, converted RAS -> LPS.
    lps_affine = nifti_affine_to_lps(image.affine)
    voxels = np.argwhere(labels_ijk > 0)[:: 5000]
    for i, j, k in voxels:
        ras = image.affine @ [i, j, k, 1]
        expected = np.array([-ras[0], -ras[1], ras[2]])
        np.testing.assert_allclose(voxel_to_lps_from_files(datasets, i, j, k), expected, atol=1e-6)
        np.testing.assert_allclose((lps_affine @ [i, j, k, 1])[:3], expected, atol=1e-9)
    rebuilt = geometry_from_datasets(datasets)
    np.testing.assert_allclose(rebuilt.voxel_centres(), case.geometry.voxel_centres(), atol=1e-6)

    # Laterality: voxel axis 0 points to the patient's left, and the right multifidus is at negative LPS x.
    assert nib.aff2axcodes(image.affine)[0] == "L"
    centres = rebuilt.voxel_centres()
    for right, left in ((1, 2), (3, 4), (5, 6), (7, 8)):
        x_right = centres[case.labels == right][:, 0].mean()
        x_left = centres[case.labels == left][:, 0].mean()
        assert x_right < 0 < x_left, (case.label_names[right], x_right, x_left)


@needs_real_data
def test_myosegmentum_in_phase_series_and_labels(tmp_path: Path) -> None:
    case = real_case_series("myosegmentum_tum01", tmp_path)
    water = np.asanyarray(nib.load(str(DEFAULT_REAL_DATA_DIR / "myosegmentum_tum01_water.nii.gz")).dataobj).astype(float)
    fat = np.asanyarray(nib.load(str(DEFAULT_REAL_DATA_DIR / "myosegmentum_tum01_fat.nii.gz")).dataobj).astype(float)
    datasets = read_series(case.paths)
    assert len(datasets) == 29 and (datasets[0].Rows, datasets[0].Columns) == (400, 400)
    written = np.stack([ds.pixel_array for ds in datasets])
    np.testing.assert_array_equal(written, dicom_grid(to_uint16(water + fat)[0]))
    assert case.label_names == {1: "multifidus R", 2: "multifidus L", 3: "erector spinae R", 4: "erector spinae L"}
    assert case.pdff is not None and 0.0 <= case.pdff.min() and case.pdff.max() <= 1.0
    # Remapped labels keep their sides: in LPS, patient right has the smaller x.
    centres = geometry_from_datasets(datasets).voxel_centres()
    for right, left in ((1, 2), (3, 4)):
        assert centres[case.labels == right][:, 0].mean() < centres[case.labels == left][:, 0].mean()
    # Erector spinae lies lateral to multifidus on each side.
    midline = 0.5 * (centres[case.labels == 1][:, 0].mean() + centres[case.labels == 2][:, 0].mean())
    assert centres[case.labels == 3][:, 0].mean() < centres[case.labels == 1][:, 0].mean() < midline
    # Fat is bright in water + fat (as on T2 TSE): inside the muscles, fatty voxels outshine lean ones.
    muscle = case.labels > 0
    assert written[muscle & (case.pdff > 0.5)].mean() > 1.2 * written[muscle & (case.pdff < 0.1)].mean()
    assert 0.02 < case.pdff[muscle].mean() < 0.3  # healthy volunteer


@needs_real_data
def test_real_series_passes_dciodvfy(tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    case = real_case_series("musclemap_sub0001", tmp_path, transfer_syntax="jpeg_lossless")
    result = subprocess.run(["dciodvfy", str(case.paths[0])], capture_output=True, text=True)
    assert [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")] == []
    assert np.array_equal(pydicom.dcmread(case.paths[3]).pixel_array, case.pixels[3])


def test_unknown_case_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown real case"):
        real_case_series("nope", tmp_path)
