"""Synthetic test data: DICOM series writer, lumbar phantom and whole synthetic studies.

Everything here is small (coarse grids, few slices) so the module runs in seconds on 2 cores.
Geometry is LPS patient mm; volumes are (slice, row, col).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from paraspinal.dicom_series_writer import (
    TRANSFER_SYNTAXES,
    SeriesInfo,
    StackGeometry,
    StudyInfo,
    axial_stack_geometry,
    geometry_from_datasets,
    stack_geometry_from_affine,
    write_mr_series,
)
from paraspinal.phantom import LABEL_NAMES, HeadPhantom, LumbarPhantom, Tissue
from paraspinal.synthetic_study import main, make_brain_study, make_sagittal_only_study, make_synthetic_study


def dciodvfy_errors(path: Path, tmp_path: Path) -> list[str]:
    """Lines starting with 'Error' from dciodvfy (deflated files are inflated first: dciodvfy cannot read them)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    target = path
    if pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES["deflate"]:
        if shutil.which("dcmconv") is None:
            pytest.skip("dcmconv (DCMTK) not installed")
        target = tmp_path / "inflated.dcm"
        subprocess.run(["dcmconv", "+te", str(path), str(target)], check=True, capture_output=True)
    result = subprocess.run(["dciodvfy", str(target)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def read_series(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


# ----------------------------------------------------------------------------- writer


@pytest.mark.parametrize("max_value", [4095, 65535])
@pytest.mark.parametrize("transfer_syntax", sorted(TRANSFER_SYNTAXES))
def test_every_transfer_syntax_is_lossless_and_valid(transfer_syntax: str, max_value: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(max_value)
    volume = rng.integers(0, max_value + 1, size=(2, 40, 36), dtype=np.uint16)
    volume[0, 0, 0] = max_value
    volume[1, :4, :4] = 0  # flat runs exercise RLE/JPEG-LS run modes
    geometry = axial_stack_geometry(2, 40, 36, (0.8, 0.6), 4.4, tilt_deg_about_lr=7.0)
    series = SeriesInfo()
    paths = write_mr_series(volume, geometry, tmp_path / "s", study=StudyInfo(), series=series,
                            transfer_syntax=transfer_syntax, start_instance=5)
    datasets = read_series(paths)
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[transfer_syntax]
        assert ds.InstanceNumber == 5 + k
        assert ds.SeriesInstanceUID == series.series_instance_uid
        assert ds.BitsStored == (16 if max_value > 4095 else 12) and ds.PixelRepresentation == 0
        np.testing.assert_array_equal(ds.pixel_array, volume[k])
    assert len({ds.SOPInstanceUID for ds in datasets}) == 2
    assert dciodvfy_errors(paths[0], tmp_path) == []


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    geometry = axial_stack_geometry(2, 4, 4, (1.0, 1.0), 3.0)
    kwargs = dict(study=StudyInfo(), series=SeriesInfo())
    with pytest.raises(ValueError, match="within 0..65535"):
        write_mr_series(-np.ones((2, 4, 4)), geometry, tmp_path, **kwargs)
    with pytest.raises(ValueError, match="slices"):
        write_mr_series(np.ones((3, 4, 4)), geometry, tmp_path, **kwargs)
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_mr_series(np.ones((2, 4, 4)), geometry, tmp_path, transfer_syntax="jpeg_lossy", **kwargs)
    with pytest.raises(ValueError, match="32 x 32"):
        write_mr_series(np.ones((2, 4, 4)), geometry, tmp_path, transfer_syntax="jpeg2000_lossless", **kwargs)


def _oblique_affine() -> np.ndarray:
    """(col, row, slice) -> LPS with a rotated plane and a slice step oblique to it (sheared stack)."""
    a = np.deg2rad(20)
    row = np.array([np.cos(a), 0.0, np.sin(a)])
    col = np.array([0.0, 1.0, 0.0])
    normal = np.cross(row, col)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = 0.7 * row, 0.9 * col
    affine[:3, 2] = 5.0 * normal + 0.4 * col
    affine[:3, 3] = (-80.0, -60.0, 12.5)
    return affine


GEOMETRIES = {
    "axial": axial_stack_geometry(4, 16, 12, (0.9375, 0.9375), 4.4, origin_lps=(3.0, 40.0, -10.0)),
    "tilted_flipped": axial_stack_geometry(4, 16, 12, (0.8, 0.6), 4.4, origin_lps=(0.0, 40.0, 5.0), tilt_deg_about_lr=-12.0,
                                           flip_rows=True, flip_cols=True, reverse_slice_order=True),
    "multi_stack": StackGeometry.concatenate([
        axial_stack_geometry(2, 16, 12, (1.0, 1.0), 4.0, origin_lps=(0.0, 30.0, z), tilt_deg_about_lr=t)
        for z, t in ((40.0, -12.0), (0.0, 0.0), (-40.0, 15.0))]),
    "from_affine": stack_geometry_from_affine(_oblique_affine(), 4, rows=16, cols=12),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_geometry_rebuilt_from_files_matches_request(name: str, tmp_path: Path) -> None:
    geometry = GEOMETRIES[name]
    volume = np.arange(geometry.n_slices * 16 * 12, dtype=np.uint16).reshape(geometry.n_slices, 16, 12)
    datasets = read_series(write_mr_series(volume, geometry, tmp_path, study=StudyInfo(), series=SeriesInfo()))
    rebuilt = geometry_from_datasets(datasets)
    # Every voxel centre from IPP/IOP/PixelSpacing of the files lands where it was asked to (DS keeps ~1e-10 mm).
    np.testing.assert_allclose(rebuilt.voxel_centres(), geometry.voxel_centres(), atol=1e-6)
    np.testing.assert_allclose(rebuilt.pixel_spacing, geometry.pixel_spacing)
    assert [(ds.Rows, ds.Columns) for ds in datasets] == [(16, 12)] * geometry.n_slices


def test_axial_stack_geometry_conventions() -> None:
    plain = axial_stack_geometry(3, 10, 20, (0.5, 0.25), 4.0, origin_lps=(1.0, 2.0, 3.0))
    np.testing.assert_allclose(plain.orientations[0], [1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose(np.diff(plain.positions[:, 2]), [4.0, 4.0])  # slices go towards the head
    centre = plain.index_to_lps(1, (10 - 1) / 2, (20 - 1) / 2)
    np.testing.assert_allclose(centre, [1.0, 2.0, 3.0], atol=1e-12)
    # PixelSpacing is (between rows, between columns): one row step moves 0.5 mm along the column direction (+y).
    np.testing.assert_allclose(plain.index_to_lps(0, 1, 0) - plain.index_to_lps(0, 0, 0), [0, 0.5, 0])
    np.testing.assert_allclose(plain.index_to_lps(0, 0, 1) - plain.index_to_lps(0, 0, 0), [0.25, 0, 0])

    flipped = axial_stack_geometry(3, 10, 20, (0.5, 0.25), 4.0, flip_rows=True, flip_cols=True, reverse_slice_order=True)
    np.testing.assert_allclose(flipped.orientations[0], [-1, 0, 0, 0, -1, 0])  # columns to the right, rows anterior
    assert np.all(np.diff(flipped.positions[:, 2]) < 0)

    tilted = axial_stack_geometry(3, 10, 20, (0.5, 0.25), 4.0, tilt_deg_about_lr=15.0)
    t = np.deg2rad(15.0)
    np.testing.assert_allclose(tilted.normals[0], [0, -np.sin(t), np.cos(t)], atol=1e-12)
    np.testing.assert_allclose(np.diff(tilted.positions, axis=0)[0], 4.0 * tilted.normals[0], atol=1e-12)

    # The affine round trip (col, row, slice) -> LPS is exact.
    again = stack_geometry_from_affine(tilted.affine_lps(), 3, 4.0, rows=10, cols=20)
    np.testing.assert_allclose(again.voxel_centres(), tilted.voxel_centres(), atol=1e-9)


# ----------------------------------------------------------------------------- phantom


def _noise_free(phantom: LumbarPhantom | HeadPhantom, geometry: StackGeometry, contrast: str = "t2"):
    return phantom.render(geometry, noise_sigma=0.0, bias_field_strength=0.0, contrast=contrast)


@pytest.fixture(scope="module")
def small_axial() -> StackGeometry:
    # 1.5 mm pixels, 5 slices around L3/L4: coarse enough to be fast, fine enough for fat fractions.
    return axial_stack_geometry(5, 150, 170, (1.5, 1.5), 6.0, origin_lps=(0.0, 45.0, 0.0))


@pytest.mark.parametrize("seed", [0, 5])
def test_labels_on_the_correct_patient_side_and_anatomically_placed(seed: int, small_axial: StackGeometry) -> None:
    phantom = LumbarPhantom(seed)
    labels = _noise_free(phantom, small_axial).labels
    points = small_axial.voxel_centres()
    centroid = {lab: points[labels == lab].mean(axis=0) for lab in LABEL_NAMES}
    assert set(np.unique(labels)) == {0, *LABEL_NAMES}
    for right, left in ((1, 2), (3, 4), (5, 6), (7, 8)):
        assert centroid[right][0] < -5 and centroid[left][0] > 5  # patient right is negative LPS x
    for mf, es, psoas, ql in ((1, 3, 5, 7), (2, 4, 6, 8)):
        assert abs(centroid[mf][0]) < abs(centroid[es][0])  # multifidus medial to erector spinae
        assert abs(centroid[es][0]) < abs(centroid[ql][0])  # quadratus lumborum most lateral
        assert centroid[psoas][1] < centroid[ql][1] < centroid[es][1]  # psoas anterior, QL between, ES posterior
        assert centroid[mf][1] > centroid[psoas][1] + 40
    # The midline (spinous process, canal, vertebral body) carries no muscle label.
    spine_y = float(phantom.spine_y(0.0))
    assert not phantom.labels_at(np.array([[0.0, y, 0.0] for y in np.linspace(spine_y, spine_y + 70, 15)])).any()


def test_psoas_grows_and_quadratus_lumborum_shrinks_caudally() -> None:
    phantom = LumbarPhantom(1)
    z_lo, z_hi = phantom.z_range
    g = axial_stack_geometry(2, 120, 140, (1.5, 1.5), z_hi - z_lo - 20, origin_lps=(0.0, 45.0, (z_lo + z_hi) / 2),
                             slice_thickness=3.0)
    labels = _noise_free(phantom, g).labels
    caudal, cranial = labels[0], labels[1]
    assert (caudal == 5).sum() > 1.8 * (cranial == 5).sum()
    assert (caudal == 7).sum() < 0.7 * (cranial == 7).sum()


def test_fat_fractions_realised_near_targets(small_axial: StackGeometry) -> None:
    phantom = LumbarPhantom(2)
    rendering = phantom.render(small_axial, supersample=2)
    true = rendering.fat_fractions
    for label, target in phantom.target_fat_fractions.items():
        assert abs(true[label] - target) < 0.03, (LABEL_NAMES[label], true[label], target)
    # Fat is bright and muscle dark on T2: the fat voxels of the muscles are brighter on average.
    muscle = rendering.labels > 0
    assert rendering.image[muscle & rendering.fat_mask].mean() > 2 * rendering.image[muscle & ~rendering.fat_mask].mean()


def test_configured_fat_fractions(small_axial: StackGeometry) -> None:
    wanted = {1: 0.40, 2: 0.05, 3: 0.25, 4: 0.25, 5: 0.0, 6: 0.10, 7: 0.20, 8: 0.03}
    true = _noise_free(LumbarPhantom(3, fat_fractions=wanted), small_axial).fat_fractions
    for label, target in wanted.items():
        assert abs(true[label] - target) < 0.03, (LABEL_NAMES[label], true[label], target)
    assert true[5] == 0.0
    with pytest.raises(ValueError):
        LumbarPhantom(0, fat_fractions=1.5)


def test_seeds_are_reproducible_and_vary(small_axial: StackGeometry) -> None:
    a, b = LumbarPhantom(11).render(small_axial), LumbarPhantom(11).render(small_axial)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = LumbarPhantom(12).render(small_axial)
    assert (a.labels != c.labels).mean() > 0.005
    assert LumbarPhantom(11).target_fat_fractions != LumbarPhantom(12).target_fat_fractions


def test_contrasts_noise_and_bias(small_axial: StackGeometry) -> None:
    phantom = LumbarPhantom(4)
    points = small_axial.voxel_centres()
    tissue = phantom.tissue_at(points.reshape(-1, 3)).reshape(points.shape[:-1])
    t2 = _noise_free(phantom, small_axial, "t2").image
    t1 = _noise_free(phantom, small_axial, "t1").image
    fat, muscle, csf = tissue == Tissue.FAT, tissue == Tissue.MUSCLE, tissue == Tissue.CSF
    assert t2[fat].mean() > 3 * t2[muscle].mean() and t2[csf].mean() > t2[muscle].mean()  # T2: fluid bright
    assert t1[fat].mean() > 2 * t1[muscle].mean() and t1[csf].mean() < t1[muscle].mean()  # T1: fluid dark
    noisy = phantom.render(small_axial, noise_sigma=20.0, bias_field_strength=0.0).image
    assert noisy.min() >= 0 and 10 < np.std(noisy[muscle] - t2[muscle]) < 30  # Rician, sigma ~ 20
    biased = phantom.render(small_axial, noise_sigma=0.0, bias_field_strength=0.5).image
    ratio = biased[muscle] / t2[muscle]
    assert ratio.std() > 0.02 and np.all(ratio > 0)  # smooth, multiplicative


def test_head_phantom_has_no_labels() -> None:
    g = axial_stack_geometry(2, 64, 64, (3.5, 3.5), 10.0)
    rendering = _noise_free(HeadPhantom(0), g)
    assert not rendering.labels.any() and rendering.image.max() > 0


# ----------------------------------------------------------------------------- studies

SMALL = dict(rows=96, cols=96, pixel_spacing=(2.5, 2.5), noise_sigma=5.0)


def _check_truth_matches_files(study, phantom: LumbarPhantom) -> None:
    """Labels re-evaluated at the voxel centres rebuilt from each written file equal the stored truth."""
    for stack in study.stacks:
        datasets = read_series(stack.paths)
        assert [ds.SOPInstanceUID for ds in datasets] == stack.sop_instance_uids
        np.testing.assert_array_equal(np.stack([ds.pixel_array for ds in datasets]), stack.image)
        centres = geometry_from_datasets(datasets).voxel_centres()
        relabelled = phantom.labels_at(centres.reshape(-1, 3)).reshape(stack.labels.shape)
        assert (relabelled != stack.labels).mean() < 1e-3  # only DS rounding at exact boundaries may differ


def test_synthetic_study_with_distractors(tmp_path: Path) -> None:
    study = make_synthetic_study(tmp_path / "dicom", seed=7, n_slices=6, **SMALL)
    assert len(study.stacks) == 1 and study.stacks[0].labels.shape == (6, 96, 96)
    _check_truth_matches_files(study, LumbarPhantom(7))
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in study.all_paths}
    assert {h.StudyInstanceUID for h in headers.values()} == {study.study_uid}
    assert len({h.FrameOfReferenceUID for h in headers.values()}) == 1
    by_series: dict[str, list] = {}
    for h in headers.values():
        by_series.setdefault(h.SeriesInstanceUID, []).append(h)
    assert set(by_series) == {study.t2_series_uid, *study.distractor_series_uids.values()}
    t2 = by_series[study.t2_series_uid][0]
    assert (float(t2.EchoTime), float(t2.RepetitionTime), list(t2.ImageType)) == (100.0, 4000.0, ["ORIGINAL", "PRIMARY", "M", "NORM"])
    assert t2.SeriesDescription == "t2_tse_tra" and t2.BodyPartExamined == "LSPINE"
    t1 = by_series[study.distractor_series_uids["axial_t1"]][0]
    assert float(t1.EchoTime) < 20 and float(t1.RepetitionTime) < 1000
    localizer = by_series[study.distractor_series_uids["localizer"]]
    assert all("LOCALIZER" in h.ImageType for h in localizer)
    normals = {tuple(np.round(np.abs(np.cross(np.array(h.ImageOrientationPatient[:3], float),
                                              np.array(h.ImageOrientationPatient[3:], float))))) for h in localizer}
    assert normals == {(0, 0, 1), (1, 0, 0), (0, 1, 0)}
    sag = by_series[study.distractor_series_uids["sagittal_t2"]][0]
    assert abs(np.cross(np.array(sag.ImageOrientationPatient[:3], float), np.array(sag.ImageOrientationPatient[3:], float))[0]) > 0.99
    for uid, series in by_series.items():
        first = min(series, key=lambda h: h.InstanceNumber)
        assert dciodvfy_errors(Path(first.filename), tmp_path) == [], first.SeriesDescription
    # True fat fractions of the written voxels are close to the phantom's targets.
    for label, ff in study.fat_fractions.items():
        assert abs(ff - study.target_fat_fractions[label]) < 0.06


def test_oblique_flipped_non_square_study(tmp_path: Path) -> None:
    study = make_synthetic_study(tmp_path, seed=3, oblique_stacks=True, flip=True, non_square_pixels=True,
                                 include_distractors=False, transfer_syntax="jpeg_ls", rows=40, cols=40,
                                 pixel_spacing=(3.0, 3.0), noise_sigma=5.0)
    assert [s.tilt_deg for s in study.stacks] == [-12.0, 0.0, 15.0] and [len(s.paths) for s in study.stacks] == [5, 5, 5]
    _check_truth_matches_files(study, LumbarPhantom(3))
    datasets = read_series(study.t2_paths)
    assert {ds.SeriesInstanceUID for ds in datasets} == {study.t2_series_uid}
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 16))
    first = datasets[0]
    # Same 120 mm field of view as asked for, in 0.8 x 0.6 mm pixels.
    assert [float(v) for v in first.PixelSpacing] == [0.8, 0.6] and (first.Rows, first.Columns) == (150, 200)
    for stack in study.stacks:
        g = geometry_from_datasets(read_series(stack.paths))
        assert np.allclose(g.orientations, g.orientations[0])  # one orientation per stack
        tilt = np.degrees(np.arctan2(-g.normals[0][1], g.normals[0][2]))
        assert np.isclose(abs(tilt), abs(stack.tilt_deg), atol=1e-6)
        assert g.row_directions[0][0] < -0.99 and g.column_directions[0][1] < -0.9  # columns right, rows anterior
        assert np.all(np.diff(g.positions[:, 2]) < 0)  # slices written towards the feet
        centres = g.voxel_centres()
        assert centres[stack.labels == 1][:, 0].mean() < 0 < centres[stack.labels == 2][:, 0].mean()


def test_sagittal_only_and_brain_studies(tmp_path: Path) -> None:
    sag = make_sagittal_only_study(tmp_path / "sag", seed=1)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sag.all_paths]
    axial = [h for h in headers if h.get("ImageType", [""])[2:3] != ["LOCALIZER"]
             and abs(np.cross(np.array(h.ImageOrientationPatient[:3], float), np.array(h.ImageOrientationPatient[3:], float))[2]) > 0.9]
    assert not sag.stacks and not axial

    brain = make_brain_study(tmp_path / "brain", rows=64, cols=64, n_slices=4, pixel_spacing=(3.5, 3.5))
    h = pydicom.dcmread(brain.t2_paths[0])
    assert h.BodyPartExamined == "BRAIN" and h.StudyDescription == "MRI BRAIN"
    assert float(h.EchoTime) >= 80 and [float(v) for v in h.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert h.pixel_array.max() > 0
    assert dciodvfy_errors(brain.t2_paths[0], tmp_path) == []


def test_cli_writes_study_and_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "out"), "--seed", "4", "--rows", "48", "--cols", "48", "--slices", "3",
                 "--no-distractors", "--transfer-syntax", "rle", "--truth-dir", str(tmp_path / "truth")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed"] == 4 and summary["t2_files"] == 3 and summary["transfer_syntax"] == "rle"
    files = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(files) == 3 and pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES["rle"]
    truth = np.load(tmp_path / "truth" / "stack0.npz")
    assert truth["labels"].shape == (3, 48, 48)
    assert json.loads((tmp_path / "truth" / "summary.json").read_text())["study_uid"] == summary["study_uid"]
