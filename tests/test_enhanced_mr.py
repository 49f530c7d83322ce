"""Enhanced MR and Legacy Converted Enhanced MR (multi-frame) input: each frame a frame source.

Studies are built from the real cases (tests/enhanced_mr_studies.py): the MuscleMap and
MyoSegmenTUM series through highdicom's legacy converter, and MyoSegmenTUM tum01 as true Enhanced
MR instances written with pydicom (two stacks at different angles in one instance, Dixon water
and fat frames in one instance). The SEG is checked on the truth-as-prediction path, as in
test_seg_sr_outputs.py: the reference labels go through the SEG writer and must come back on the
right source frames voxel for voxel.
"""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_validators import dciodvfy_errors, dcmjs_read, dcmqi_read_seg, dcmqi_read_sr
from enhanced_mr_studies import legacy_converted, write_real_enhanced_study
from paraspinal.dicom_index import index_folder
from paraspinal.dicom_outputs import build_measurement_report, build_segmentation
from paraspinal.dixon import find_dixon_pair, pdff_on_stack
from paraspinal.enhanced_mr import frame_headers
from paraspinal.nifti_to_dicom import real_case_series
from paraspinal.quantification import measure_stack
from paraspinal.series_selection import select_series
from paraspinal.stacks import load_stack


def _chosen_stacks(folder: Path, config):
    (study,) = index_folder(folder).studies.values()
    selection = select_series(study, config.selection)
    assert selection.chosen is not None, selection.reason
    return study, selection, [load_stack(p, selection.chosen.series_uid, i)
                              for i, p in enumerate(selection.chosen.stacks, start=1)]


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory, real_data, config):
    written = write_real_enhanced_study(real_data, tmp_path_factory.mktemp("enhanced"))
    study, selection, stacks = _chosen_stacks(written.folder, config)
    return {"written": written, "study": study, "selection": selection, "stacks": stacks}


@pytest.mark.parametrize("case", ["musclemap_sub0001", "myosegmentum_tum01"])
def test_legacy_converted_series_loads_voxel_for_voxel_like_its_classic_source(case, tmp_path, real_data, config):
    classic = real_case_series(case, tmp_path / "classic", data_dir=real_data)
    _, _, (classic_stack,) = _chosen_stacks(tmp_path / "classic", config)
    converted = legacy_converted([pydicom.dcmread(p) for p in classic.paths])
    (tmp_path / "legacy").mkdir()
    converted.save_as(tmp_path / "legacy" / "mf.dcm", enforce_file_format=True)
    _, selection, (stack,) = _chosen_stacks(tmp_path / "legacy", config)
    assert selection.chosen.series_uid == str(converted.SeriesInstanceUID)
    assert stack.is_multi_frame and sorted(stack.frame_numbers) == list(range(1, len(classic.paths) + 1))
    np.testing.assert_array_equal(stack.pixels, classic_stack.pixels)
    np.testing.assert_allclose(stack.affine_lps, classic_stack.affine_lps, atol=1e-4)
    assert [str(ds.SOPInstanceUID) for ds in stack.sources] == [str(converted.SOPInstanceUID)]


def test_true_enhanced_mr_frames_give_timing_frame_type_and_stacks_split_by_orientation(enhanced):
    written, selection, stacks = enhanced["written"], enhanced["selection"], enhanced["stacks"]
    chosen = selection.chosen
    assert chosen.series_uid == written.t2_series_uid
    # TE/TR come from the MR Echo / MR Timing sequences only (the instance has no top-level EchoTime).
    assert "EchoTime" not in pydicom.dcmread(written.t2_path, stop_before_pixels=True)
    assert "TE 100 ms, TR 4000 ms" in chosen.reason and "2 stack(s)" in chosen.reason
    assert [s.frame_numbers for s in stacks] == written.stack_frames
    normals = [np.cross(s.affine_lps[:3, 0], s.affine_lps[:3, 1]) for s in stacks]
    cosine = abs(float(np.dot(normals[0], normals[1]) / np.linalg.norm(normals[0]) / np.linalg.norm(normals[1])))
    assert np.degrees(np.arccos(min(1.0, cosine))) == pytest.approx(14.0, abs=0.1)
    dixon = next(d for d in selection.decisions if d.description == "dixon_tra")
    assert not dixon.accepted and "DERIVED" in dixon.reason  # ImageType from FrameType


def test_dixon_water_and_fat_frames_of_one_instance_are_told_apart_and_give_the_pdff(enhanced, bundle):
    stacks, written = enhanced["stacks"], enhanced["written"]
    axial = next(s for s in stacks if s.n_slices == 29)
    pair, why = find_dixon_pair(enhanced["study"], str(axial.datasets[0].FrameOfReferenceUID),
                                {enhanced["selection"].chosen.series_uid})
    assert pair is not None, why
    assert pair.water.series_uid == pair.fat.series_uid  # one series, one instance: split per frame
    assert {r.frame_number % 2 for r in pair.water.instances} == {1}  # frames W1 F1 W2 F2 ...
    assert {r.frame_number % 2 for r in pair.fat.instances} == {0}
    pdff = pdff_on_stack(pair, axial)
    labels = written.stack_labels[stacks.index(axial)]
    muscle = labels > 0
    assert np.abs(pdff[muscle] - written.pdff_truth[muscle]).max() < 0.002


@pytest.fixture(scope="module")
def enhanced_outputs(enhanced, bundle, config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("enhanced_out")
    results = []
    for stack, labels in zip(enhanced["stacks"], enhanced["written"].stack_labels):
        seg = build_segmentation(stack, labels, bundle, config.output)
        seg.dataset.save_as(folder / f"seg{stack.index}.dcm", enforce_file_format=True)
        results.append((stack, seg, measure_stack(stack, labels, bundle.labels)))
    sr = build_measurement_report(results, bundle, config.output)
    sr.save_as(folder / "sr.dcm", enforce_file_format=True)
    return {"folder": folder, "results": results}


def test_seg_and_sr_of_enhanced_sources_pass_dciodvfy(enhanced_outputs):
    folder = enhanced_outputs["folder"]
    for path in sorted(folder.glob("seg*.dcm")) + [folder / "sr.dcm"]:
        assert dciodvfy_errors(path) == [], path.name


def test_seg_references_each_source_frame_and_maps_back_voxel_for_voxel(enhanced, enhanced_outputs):
    t2 = pydicom.dcmread(enhanced["written"].t2_path, stop_before_pixels=True)
    source_positions = [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                        for f in t2.PerFrameFunctionalGroupsSequence]
    for (stack, seg_result, _), labels in zip(enhanced_outputs["results"], enhanced["written"].stack_labels):
        seg = hd.seg.segread(enhanced_outputs["folder"] / f"seg{stack.index}.dcm")
        assert [str(s.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence] \
            == [str(t2.SOPInstanceUID)]
        orientation = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                       .ImageOrientationPatient]
        np.testing.assert_allclose(orientation, [float(v) for v in stack.datasets[0].ImageOrientationPatient],
                                   atol=1e-6)
        for frame in seg.PerFrameFunctionalGroupsSequence:
            (source,) = frame.DerivationImageSequence[0].SourceImageSequence
            assert str(source.ReferencedSOPInstanceUID) == str(t2.SOPInstanceUID)
            referenced = int(source.ReferencedFrameNumber)
            assert referenced in stack.frame_numbers  # never a frame of the other stack
            position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            np.testing.assert_allclose(position, source_positions[referenced - 1], atol=1e-4)
        numbers = seg_result.segment_numbers
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=str(t2.SOPInstanceUID), source_frame_numbers=stack.frame_numbers,
            segment_numbers=list(numbers.values()), combine_segments=True, relabel=False,
            skip_overlap_checks=True)
        back = np.zeros_like(labels)
        for value, number in numbers.items():
            back[pixels == number] = value
        np.testing.assert_array_equal(back, labels)


def test_dcmqi_reads_the_enhanced_source_seg_and_sr(enhanced, enhanced_outputs, tmp_path):
    folder = enhanced_outputs["folder"]
    for (stack, seg_result, _), labels in zip(enhanced_outputs["results"], enhanced["written"].stack_labels):
        read = dcmqi_read_seg(folder / f"seg{stack.index}.dcm", tmp_path / f"s{stack.index}")
        for value, number in seg_result.segment_numbers.items():
            assert read.segment(number).voxel_count == int((labels == value).sum())
    report = dcmqi_read_sr(folder / "sr.dcm", tmp_path / "sr")
    ids = {g["TrackingIdentifier"] for g in report["Measurements"]}
    assert {"stack 1 erector spinae right", "stack 2 multifidus left"} <= ids


def test_dcmjs_places_the_seg_on_the_source_frames_as_ohif_does(enhanced, enhanced_outputs):
    """dcmjs' Cornerstone adapter with the multi-frame source split into per-frame image ids (as
    cornerstone's WADO loader names frames): every voxel lands on its frame, stack by stack."""
    folder = enhanced_outputs["folder"]
    for (stack, seg_result, _), labels in zip(enhanced_outputs["results"], enhanced["written"].stack_labels):
        adapter = dcmjs_read(folder / f"seg{stack.index}.dcm", source_paths=[enhanced["written"].t2_path])["seg"][
            "adapter"]
        assert adapter["decoded"], adapter
        assert len(adapter["perImage"]) == stack.n_slices  # the other stack's frames are not this display set
        for value, number in seg_result.segment_numbers.items():
            assert adapter["voxelCounts"][str(number)] == int((labels == value).sum())
            per_slice = [image["voxelCounts"].get(str(number), 0) for image in adapter["perImage"]]
            assert per_slice == [int(n) for n in (labels == value).sum(axis=(1, 2))]


def test_sr_slice_groups_reference_the_source_frame(enhanced_outputs):
    sr = pydicom.dcmread(enhanced_outputs["folder"] / "sr.dcm")
    frames_by_stack = {s.index: set(s.frame_numbers) for s, _, _ in enhanced_outputs["results"]}
    seen = 0

    def walk(items, stack_index=None):
        nonlocal seen
        for item in items:
            if item.get("ValueType") == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "112039":
                stack_index = int(str(item.TextValue).split()[1].rstrip(":")) if str(item.TextValue).startswith("stack") else None
            for reference in item.get("ReferencedSOPSequence", []):
                if "ReferencedFrameNumber" in reference and stack_index is not None and \
                        str(reference.ReferencedSOPClassUID) == "1.2.840.10008.5.1.4.1.1.4.1":
                    frames = reference.ReferencedFrameNumber
                    frames = [int(f) for f in (frames if isinstance(frames, list) or hasattr(frames, "__iter__")
                                               and not isinstance(frames, str) else [frames])]
                    assert set(frames) <= frames_by_stack[stack_index]
                    seen += 1
            walk(item.get("ContentSequence", []), stack_index)

    for group in sr.ContentSequence:
        walk([group])
    assert seen > 0


def _broken(tmp_path: Path, real_data: Path, edit, name: str) -> str:
    """The legacy-converted tum01 series with ``edit`` applied; the series' selection reason."""
    classic = real_case_series("myosegmentum_tum01", tmp_path / "classic", data_dir=real_data)
    converted = legacy_converted([pydicom.dcmread(p) for p in classic.paths])
    edit(converted)
    folder = tmp_path / name
    folder.mkdir()
    converted.save_as(folder / "mf.dcm", enforce_file_format=True)
    (study,) = index_folder(folder).studies.values()
    from app.config import load_config

    (decision,) = select_series(study, load_config(environ={}).selection).decisions
    assert not decision.accepted
    return decision.reason


def _drop_plane_position_of_frame_3(ds) -> None:
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence


def _drop_echo_time(ds) -> None:
    del ds.SharedFunctionalGroupsSequence[0].UnassignedSharedConvertedAttributesSequence[0].EchoTime


def _drop_a_per_frame_item(ds) -> None:
    del ds.PerFrameFunctionalGroupsSequence[-1]


def _two_orientation_items(ds) -> None:
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PlaneOrientationSequence.append(copy.deepcopy(shared.PlaneOrientationSequence[0]))


@pytest.mark.parametrize("edit, expected", [
    (_drop_plane_position_of_frame_3, ["frame 3", "missing ImagePositionPatient", "PlanePositionSequence"]),
    (_drop_echo_time, ["EchoTime missing", "MREchoSequence"]),
    (_drop_a_per_frame_item, ["PerFrameFunctionalGroupsSequence (5200,9230) has 28 items, NumberOfFrames is 29"]),
    (_two_orientation_items, ["SharedFunctionalGroupsSequence > PlaneOrientationSequence has 2 items"]),
], ids=["no_plane_position", "no_echo_time", "frame_count", "two_orientations"])
def test_bad_functional_groups_reject_the_series_with_the_attribute_named(edit, expected, tmp_path, real_data):
    reason = _broken(tmp_path, real_data, edit, edit.__name__)
    for text in expected:
        assert text in reason, reason


def test_frame_headers_prefer_per_frame_values_over_shared_ones(tmp_path, real_data):
    classic = real_case_series("myosegmentum_tum01", tmp_path / "classic", data_dir=real_data)
    converted = legacy_converted([pydicom.dcmread(p) for p in classic.paths])
    item = pydicom.Dataset()
    item.PixelSpacing = [0.5, 0.5]
    converted.PerFrameFunctionalGroupsSequence[4].PixelMeasuresSequence = [item]
    frames = frame_headers(converted)
    assert [float(v) for v in frames[4].PixelSpacing] == [0.5, 0.5]
    assert [float(v) for v in frames[3].PixelSpacing] != [0.5, 0.5]
    assert [int(f.InstanceNumber) for f in frames] == list(range(1, 30))
    assert int(converted.InstanceNumber) == 1  # the instance's own elements are never changed


def test_a_stack_spread_over_several_multi_frame_instances_is_refused_with_its_reason(tmp_path, real_data, config):
    classic = real_case_series("myosegmentum_tum01", tmp_path / "classic", data_dir=real_data)
    datasets = [pydicom.dcmread(p) for p in classic.paths]
    series_uid = hd.UID()
    (tmp_path / "split").mkdir()
    for number, part in enumerate((datasets[:15], datasets[15:]), start=1):
        hd.legacy.LegacyConvertedEnhancedMRImage(part, series_instance_uid=series_uid, series_number=3,
                                                 sop_instance_uid=hd.UID(), instance_number=number
                                                 ).save_as(tmp_path / "split" / f"mf{number}.dcm",
                                                           enforce_file_format=True)
    (study,) = index_folder(tmp_path / "split").studies.values()
    (decision,) = select_series(study, config.selection).decisions
    assert not decision.accepted
    assert "stack 1 takes its slices from 2 multi-frame instance(s)" in decision.reason, decision.reason
