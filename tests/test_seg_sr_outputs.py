"""The SEG and SR the node writes: valid DICOM, readable by highdicom, dcmqi (3D Slicer) and
dcmjs (OHIF), and geometrically right.

Geometry is checked on the truth-as-prediction path: the reference segmentation of a real
case (MuscleMap sample, whose affine is slightly oblique) goes through the same SEG writer the
model's labels go through, is read back, mapped to the source instances and compared with
the truth voxel for voxel. Segmentation quality itself is the model's business, not tested here.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_validators import dciodvfy_errors, dcmjs_read, dcmqi_read_seg, dcmqi_read_sr
from paraspinal.dicom_index import index_folder
from paraspinal.dicom_outputs import build_measurement_report, build_segmentation
from paraspinal.dicom_series_writer import SeriesInfo, StudyInfo, stack_geometry_from_affine, write_mr_series
from paraspinal.quantification import measure_stack
from paraspinal.series_selection import select_series
from paraspinal.stacks import load_stack

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_real_case(real_data: Path, out_dir: Path, *, flip: bool = False,
                    transfer_syntax: str = "explicit_little") -> tuple[list[str], np.ndarray]:
    """MuscleMap sample as an MR series; returns SOP Instance UIDs in written slice order and
    the reference labels in (slice, row, col) written order. ``flip`` reverses the column
    direction and the slice order, a different but valid orientation."""
    image = nib.load(real_data / "musclemap_sub0001_image.nii.gz")
    labels = np.asarray(nib.load(real_data / "musclemap_sub0001_dseg.nii.gz").dataobj).astype(np.uint8)
    volume = np.asarray(image.dataobj)
    affine = LPS_FROM_RAS @ image.affine  # maps (i, j, k) to LPS
    if flip:
        for axis in (0, 2):
            affine[:3, 3] += affine[:3, axis] * (volume.shape[axis] - 1)
            affine[:3, axis] *= -1
            volume, labels = np.flip(volume, axis), np.flip(labels, axis)
    pixels = volume.transpose(2, 1, 0)  # (i, j, k) -> (slice, row, col) with col = i
    geometry = stack_geometry_from_affine(affine, pixels.shape[0], rows=pixels.shape[1], cols=pixels.shape[2])
    files = write_mr_series(pixels, geometry, out_dir, study=StudyInfo(), series=SeriesInfo(),
                            transfer_syntax=transfer_syntax)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return uids, np.ascontiguousarray(labels.transpose(2, 1, 0))


def load_single_stack(folder: Path, config):
    index = index_folder(folder)
    (study,) = index.studies.values()
    selection = select_series(study, config.selection)
    assert selection.chosen is not None, selection.reason
    (plan,) = selection.chosen.stacks
    return load_stack(plan, selection.chosen.series_uid, 1)


def truth_in_stack_order(stack, uids: list[str], truth: np.ndarray) -> np.ndarray:
    order = {uid: k for k, uid in enumerate(uids)}
    return np.stack([truth[order[str(ds.SOPInstanceUID)]] for ds in stack.datasets])


@pytest.fixture(scope="module", params=[False, True], ids=["as_acquired", "flipped"])
def written(request, tmp_path_factory, real_data, bundle, config):
    folder = tmp_path_factory.mktemp("case")
    uids, truth = write_real_case(real_data, folder / "in", flip=request.param)
    stack = load_single_stack(folder / "in", config)
    labels = truth_in_stack_order(stack, uids, truth)
    seg = build_segmentation(stack, labels, bundle, config.output)
    measures = measure_stack(stack, labels, bundle.labels)
    sr = build_measurement_report([(stack, seg, measures)], bundle, config.output)
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    seg.dataset.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    return {"folder": folder, "stack": stack, "labels": labels, "seg": seg, "measures": measures,
            "seg_path": seg_path, "sr_path": sr_path, "source_files": sorted((folder / "in").iterdir())}


def test_seg_and_sr_pass_dciodvfy_without_errors(written):
    assert dciodvfy_errors(written["seg_path"]) == []
    assert dciodvfy_errors(written["sr_path"]) == []


def test_seg_read_back_by_highdicom_matches_truth_on_every_source_instance(written, bundle):
    seg = hd.seg.segread(written["seg_path"])
    assert seg.SegmentationType == "BINARY"
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    numbers = written["seg"].segment_numbers
    for k, ds in enumerate(written["stack"].datasets):
        truth = written["labels"][k]
        if not truth.any():
            continue
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID)], segment_numbers=list(numbers.values()),
            combine_segments=True, relabel=False, skip_overlap_checks=True)[0]
        back = np.zeros_like(truth)
        for value, number in numbers.items():
            back[pixels == number] = value
        np.testing.assert_array_equal(back, truth)


def test_seg_segments_carry_codes_laterality_and_colour_from_the_bundle(written, bundle):
    seg = hd.seg.segread(written["seg_path"])
    for value, number in written["seg"].segment_numbers.items():
        info = bundle.label(value)
        desc = seg.get_segment_description(number)
        assert desc.segment_label == info.name
        assert desc.segmented_property_type.value == info.code.value
        modifier = desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
        assert modifier.CodeValue == info.laterality.value
        assert desc.algorithm_identification[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert "RecommendedDisplayCIELabValue" in desc


def test_dcmqi_reads_seg_with_right_voxel_counts_and_patient_side(written, tmp_path):
    result = dcmqi_read_seg(written["seg_path"], tmp_path)
    for value, number in written["seg"].segment_numbers.items():
        segment = result.segment(number)
        assert segment.voxel_count == int((written["labels"] == value).sum())
        # Patient right is LPS x < 0: the right-sided labels are odd in the bundle's table.
        centroid_x = float(segment.affine_lps[0] @ np.r_[np.argwhere(segment.mask).mean(axis=0), 1.0])
        assert (centroid_x < 0) == (value % 2 == 1), f"label {value} on the wrong side"


def test_dcmjs_reads_seg_onto_source_images_and_sr_measurements(written):
    seg = dcmjs_read(written["seg_path"], source_paths=written["source_files"])["seg"]
    for counts in (seg["pixelDecoding"]["voxelCounts"], seg["adapter"]["voxelCounts"]):
        for value, number in written["seg"].segment_numbers.items():
            assert counts[str(number)] == int((written["labels"] == value).sum())
    sr = dcmjs_read(written["sr_path"])["sr"]
    assert sr["templateIdentifier"] == "1500"
    found = {f"stack 1 {m.name}": m for m in written["measures"] if m.found}
    volumetric = [g for g in sr["measurementGroups"] if g["trackingIdentifier"] in found]
    assert {g["trackingIdentifier"] for g in volumetric} == set(found)
    for group in volumetric:
        m = found[group["trackingIdentifier"]]
        assert group["referencedSegment"]["segmentNumber"] == written["seg"].segment_numbers[m.label]
        values = {(x["conceptName"]["CodeValue"], x["unit"]["CodeValue"]): x["value"] for x in group["measurements"]}
        assert values[("118565006", "cm3")] == pytest.approx(m.volume_cm3)


def test_tid1500reader_returns_each_muscle_with_volume_area_and_fat_fraction(written, tmp_path):
    report = dcmqi_read_sr(written["sr_path"], tmp_path)
    groups = report["Measurements"]
    by_id = {g["TrackingIdentifier"]: g for g in groups}
    for m in written["measures"]:
        if not m.found:
            continue
        group = by_id[f"stack 1 {m.name}"]
        items = {(i["quantity"]["CodeMeaning"], i.get("derivationModifier", {}).get("CodeMeaning", "")): i
                 for i in group["measurementItems"]}
        volume = items[("Volume", "")]
        assert volume["units"]["CodeValue"] == "cm3"
        assert float(volume["value"]) == pytest.approx(m.volume_cm3, rel=1e-6)
        assert items[("Fat fraction", "")]["units"]["CodeValue"] == "%"
        assert float(items[("Area", "Mean")]["value"]) == pytest.approx(m.mean_csa_mm2 / 100, abs=1e-3)


def test_measured_volumes_follow_voxel_counts_and_slice_step(written):
    stack = written["stack"]
    for m in written["measures"]:
        n = int((written["labels"] == m.label).sum())
        expected = n * stack.pixel_spacing_mm[0] * stack.pixel_spacing_mm[1] * stack.slice_step_mm / 1000
        assert m.volume_cm3 == pytest.approx(expected, rel=1e-3)
        assert 0.0 <= (m.fat_fraction_pct or 0.0) <= 100.0


def test_disc_angled_stacks_map_back_exactly_and_share_one_report(tmp_path, bundle, config):
    """Three stacks tilted -12..+15 deg in one series: one SEG each, voxel-exact, one SR for all."""
    from paraspinal.synthetic_study import make_synthetic_study

    study = make_synthetic_study(tmp_path / "in", seed=31, oblique_stacks=True, non_square_pixels=True,
                                 include_distractors=False)
    (study_record,) = index_folder(tmp_path / "in").studies.values()
    selection = select_series(study_record, config.selection)
    truth = {uid: s.labels[k] for s in study.stacks for k, uid in enumerate(s.sop_instance_uids)}
    results = []
    for index, plan in enumerate(selection.chosen.stacks, start=1):
        stack = load_stack(plan, selection.chosen.series_uid, index)
        labels = np.stack([truth[str(ds.SOPInstanceUID)] for ds in stack.datasets])
        seg = build_segmentation(stack, labels, bundle, config.output)
        path = tmp_path / f"seg{index}.dcm"
        seg.dataset.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        back = hd.seg.segread(path)
        for k, ds in enumerate(stack.datasets):
            if not labels[k].any():
                continue
            pixels = back.get_pixels_by_source_instance(
                source_sop_instance_uids=[str(ds.SOPInstanceUID)], segment_numbers=list(seg.segment_numbers.values()),
                combine_segments=True, relabel=False, skip_overlap_checks=True)[0]
            mapped = np.zeros_like(labels[k])
            for value, number in seg.segment_numbers.items():
                mapped[pixels == number] = value
            np.testing.assert_array_equal(mapped, labels[k])
        results.append((stack, seg, measure_stack(stack, labels, bundle.labels)))
    assert len(results) == 3
    sr_path = tmp_path / "sr.dcm"
    build_measurement_report(results, bundle, config.output).save_as(sr_path, enforce_file_format=True)
    assert dciodvfy_errors(sr_path) == []
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    referenced = {g.referenced_segment.referenced_sop_instance_uid for g in groups}
    assert referenced == {str(seg.dataset.SOPInstanceUID) for _, seg, _ in results}


def test_output_uids_are_stable_for_the_same_input_and_change_with_it():
    from paraspinal.dicom_outputs import stable_uid

    first = stable_uid("1.2.3", "1", "weights", "seg-instance")
    assert first == stable_uid("1.2.3", "1", "weights", "seg-instance")
    assert first != stable_uid("1.2.3", "1", "other weights", "seg-instance")
    assert first.startswith("2.25.") and len(first) <= 64
