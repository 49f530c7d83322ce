"""The SR's outline groups (what OHIF and most PACS viewers can show): a closed SCOORD POLYLINE of
each muscle on the key slices, in the source image's pixel coordinates, with area, fat fraction
and tracking identifiers a reader understands; valid DICOM read back by highdicom and dcmqi.

Geometry is checked on the truth-as-prediction path of a real case (MuscleMap sample written as
DICOM, see tests/test_seg_sr_outputs.py): the outline drawn back into the image grid must cover
the muscle's mask on that source image.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from skimage.draw import polygon as fill_polygon

from dicom_validators import dciodvfy_errors, dcmjs_read, dcmqi_read_sr
from paraspinal.dicom_outputs import (OHIF_FREEHAND_TRACKING_PREFIX, build_measurement_report, build_segmentation,
                                      build_viewer_report, outline_tracking_identifier)
from paraspinal.key_slices import KeySlice, key_slices
from paraspinal.muscle_outlines import muscle_outline
from paraspinal.quantification import measure_stack
from paraspinal.report_pdf import ReportStack, _band_panels
from test_seg_sr_outputs import load_single_stack, truth_in_stack_order, write_real_case


def test_outline_of_a_rectangle_follows_pixel_edges_in_image_coordinates():
    mask = np.zeros((40, 80), dtype=bool)
    mask[10:20, 30:50] = True  # rows 10-19, columns 30-49
    outline = muscle_outline(mask, tolerance_px=0.0)  # unsimplified: the corners are cut by half a pixel
    points = outline.points
    assert np.array_equal(points[0], points[-1])
    # DICOM image coordinates: column, row; pixel [r, c] spans c..c+1 and r..r+1.
    assert points[:, 0].min() == pytest.approx(30.0) and points[:, 0].max() == pytest.approx(50.0)
    assert points[:, 1].min() == pytest.approx(10.0) and points[:, 1].max() == pytest.approx(20.0)
    assert outline.enclosed_area_px() == pytest.approx(200, rel=0.02)
    assert outline.n_components == 1


def test_outline_takes_the_largest_piece_and_counts_the_pieces():
    mask = np.zeros((50, 50), dtype=bool)
    mask[5:10, 5:10] = True
    mask[20:40, 20:45] = True
    outline = muscle_outline(mask)
    assert outline.n_components == 2
    assert points_in(outline.points, columns=(20, 45), rows=(20, 40))
    assert muscle_outline(np.zeros((5, 5), dtype=bool)) is None


def points_in(points: np.ndarray, columns: tuple[float, float], rows: tuple[float, float]) -> bool:
    return bool((points[:, 0] >= columns[0]).all() and (points[:, 0] <= columns[1]).all()
                and (points[:, 1] >= rows[0]).all() and (points[:, 1] <= rows[1]).all())


def test_outline_of_a_blob_is_simplified_but_stays_on_its_boundary():
    rows, cols = np.mgrid[:120, :120]
    mask = ((rows - 60) / 40.0) ** 2 + ((cols - 55) / 25.0) ** 2 <= 1.0
    outline = muscle_outline(mask)
    assert len(outline.points) < 80  # simplified (the raw contour has ~250 points)
    assert outline.enclosed_area_px() == pytest.approx(mask.sum(), rel=0.03)


def test_key_slices_one_per_level_then_bands_of_about_30_mm():
    z = [float(4 * k) for k in range(30)]  # 4 mm apart
    levels = ["L4/L5"] * 5 + [None] * 25
    present = list(range(30))
    area = {k: float(k % 7) for k in present}
    keys = key_slices(z, levels, present, area.get)
    assert keys[0] == KeySlice(index=4, slices=(0, 1, 2, 3, 4), level="L4/L5", title="level L4/L5")
    assert all(k.level is None for k in keys[1:]) and len(keys) == 1 + 4  # 5..29: 96 mm -> 4 bands
    for key in keys:
        assert area[key.index] == max(area[k] for k in key.slices)


@pytest.fixture(scope="module")
def outlined(tmp_path_factory, real_data, bundle, config):
    folder = tmp_path_factory.mktemp("outlines")
    uids, truth = write_real_case(real_data, folder / "in")
    stack = load_single_stack(folder / "in", config)
    labels = truth_in_stack_order(stack, uids, truth)
    seg = build_segmentation(stack, labels, bundle, config.output)
    measures = measure_stack(stack, labels, bundle.labels)
    sr = build_measurement_report([(stack, seg, measures)], bundle, config.output)
    viewer = build_viewer_report([(stack, seg, measures)], bundle, config.output)
    paths = {"sr": folder / "sr.dcm", "viewer": folder / "sr_viewer.dcm"}
    sr.save_as(paths["sr"], enforce_file_format=True)
    viewer.save_as(paths["viewer"], enforce_file_format=True)
    return {"stack": stack, "labels": labels, "seg": seg, "measures": measures, "paths": paths,
            "folder": folder}


def _readable(identifier) -> str:
    """The tracking identifier a reader sees: the viewer SR's without its OHIF tool prefix."""
    return str(identifier).removeprefix(OHIF_FREEHAND_TRACKING_PREFIX + ":")


def _region_groups(path) -> list:
    sr = hd.sr.srread(path)
    return [g for g in sr.content.get_planar_roi_measurement_groups() if g.roi is not None]


def test_viewer_and_complete_sr_pass_dciodvfy(outlined):
    assert dciodvfy_errors(outlined["paths"]["viewer"]) == []
    assert dciodvfy_errors(outlined["paths"]["sr"]) == []


def test_viewer_sr_holds_only_outline_groups_and_the_complete_sr_ends_with_the_same(outlined):
    viewer = hd.sr.srread(outlined["paths"]["viewer"])
    groups = viewer.content.get_planar_roi_measurement_groups()
    assert groups and all(g.roi is not None for g in groups)
    assert not viewer.content.get_volumetric_roi_measurement_groups()
    complete = hd.sr.srread(outlined["paths"]["sr"]).content
    last = complete.get_planar_roi_measurement_groups()[-len(groups):]  # OHIF needs them last
    assert [OHIF_FREEHAND_TRACKING_PREFIX + ":" + str(g.tracking_identifier) for g in last] == [
        str(g.tracking_identifier) for g in groups]
    assert all(g.roi is not None for g in last)


def test_viewer_sr_outlines_are_in_the_form_ohif_takes_over_as_its_own_measurements(outlined):
    """OHIF's adapters (@cornerstonejs/adapters) want a Cornerstone tool in the tracking identifier,
    the outline under the first NUM item and a Comment as the label; highdicom still reads the group."""
    viewer = hd.sr.srread(outlined["paths"]["viewer"])
    for group in viewer.content.get_planar_roi_measurement_groups():
        name = str(group.tracking_identifier)
        assert name.startswith(OHIF_FREEHAND_TRACKING_PREFIX + ":")
        readable = name[len(OHIF_FREEHAND_TRACKING_PREFIX) + 1:]
        items = group[0].ContentSequence if hasattr(group[0], "ContentSequence") else group.ContentSequence
        first_num = next(item for item in items if item.ValueType == "NUM")
        assert first_num.ConceptNameCodeSequence[0].CodeMeaning == "Area"
        inferred = [i for i in first_num.ContentSequence if i.ValueType == "SCOORD"]
        assert len(inferred) == 1 and inferred[0].RelationshipType == "INFERRED FROM"
        assert list(inferred[0].GraphicData) == list(group.roi.GraphicData)
        assert (inferred[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                == group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        comments = [i.TextValue for i in items if i.ValueType == "TEXT"
                    and i.ConceptNameCodeSequence[0].CodeValue == "121106"]
        assert len(comments) == 1 and comments[0].startswith(readable)
        fat = [m for m in group.get_measurements() if m.name.meaning == "Fat fraction"]
        if fat:
            assert f"fat {float(fat[0].value):.1f} %" in comments[0]


def test_outline_groups_are_on_the_pdf_key_slices_for_every_found_muscle(outlined, bundle):
    stack, measures = outlined["stack"], outlined["measures"]
    keys = [panel[1] for panel in _band_panels([ReportStack(stack, outlined["labels"], measures)])]
    by_sop = {str(ds.SOPInstanceUID): k for k, ds in enumerate(stack.datasets)}
    groups = _region_groups(outlined["paths"]["viewer"])
    seen = {(by_sop[g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID], _readable(g.tracking_identifier))
            for g in groups}
    expected = set()
    for k in keys:
        for m in measures:
            if m.found and (outlined["labels"][k] == m.label).any():
                key = KeySlice(index=k, slices=(k,), level=None, title="")
                expected.add((k, outline_tracking_identifier(bundle.label(m.label), key)))
    assert seen == expected


def test_each_outline_covers_its_muscle_on_its_source_image_and_carries_its_values(outlined):
    stack, labels = outlined["stack"], outlined["labels"]
    by_sop = {str(ds.SOPInstanceUID): k for k, ds in enumerate(stack.datasets)}
    measures = {m.name: m for m in outlined["measures"]}
    for group in _region_groups(outlined["paths"]["viewer"]):
        roi = group.roi
        assert roi.GraphicType == "POLYLINE"
        points = np.asarray(roi.value).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1]), "the outline must be closed"
        k = by_sop[roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        name = _readable(group.tracking_identifier).split(",")[0]
        m = measures[name]
        mask = labels[k] == m.label
        # Pixel centres (c + 0.5, r + 0.5) inside the polygon: the outline drawn back into the grid.
        rr, cc = fill_polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, shape=mask.shape)
        drawn = np.zeros_like(mask)
        drawn[rr, cc] = True
        largest = muscle_outline(mask)
        if largest.n_components == 1:
            dice = 2 * (drawn & mask).sum() / (drawn.sum() + mask.sum())
            assert dice > 0.9, (str(group.tracking_identifier), dice)
        else:  # several pieces: the outline is the largest one, inside the muscle
            assert (drawn & mask).sum() > 0.9 * drawn.sum()
        values = {item.name.meaning: float(item.value) for item in group.get_measurements()}
        assert values["Area"] == pytest.approx(m.slice_csa_mm2[k], abs=0.01)
        assert values["Fat fraction"] == pytest.approx(m.slice_fat_fraction_pct[k], abs=0.01)


def test_dcmqi_reads_outline_groups_with_finding_laterality_and_area(outlined, bundle, tmp_path):
    result = dcmqi_read_sr(outlined["paths"]["viewer"], tmp_path)
    sides = {info.name: info.laterality.meaning for info in bundle.labels}
    assert result["Measurements"]
    for group in result["Measurements"]:
        name = _readable(group["TrackingIdentifier"]).split(",")[0]
        assert group["Laterality"]["CodeMeaning"] == sides[name]
        quantities = {item["quantity"]["CodeMeaning"] for item in group["measurementItems"]}
        assert {"Area", "Fat fraction"} <= quantities


def test_dcmjs_reads_every_outline_group_with_its_area(outlined):
    groups = _region_groups(outlined["paths"]["viewer"])
    sr = dcmjs_read(outlined["paths"]["viewer"])["sr"]
    assert sr["templateIdentifier"] == "1500"
    read = {g["trackingIdentifier"]: g for g in sr["measurementGroups"]}
    assert set(read) == {str(g.tracking_identifier) for g in groups}
    for group in groups:
        js = read[str(group.tracking_identifier)]
        values = {m["conceptName"]["CodeMeaning"]: (float(m["value"]), m["unit"]["CodeValue"]) for m in js["measurements"]}
        area = next(float(i.value) for i in group.get_measurements() if i.name.meaning == "Area")
        assert values["Area"] == (pytest.approx(area), "mm2")
        side = js["findingSites"][0]["laterality"]["CodeMeaning"].lower()
        assert _readable(group.tracking_identifier).split(",")[0].endswith(side)


def test_outline_evaluator_adds_a_qualitative_evaluation_to_each_group(outlined, bundle, config):
    flag = hd.sr.CodedConcept("REVIEW", "99PARASPINAL", "Review recommended")
    yes = hd.sr.CodedConcept("373066001", "SCT", "Yes")
    sr = build_viewer_report([(outlined["stack"], outlined["seg"], outlined["measures"])], bundle, config.output,
                             evaluate_outline=lambda m, key: [hd.sr.QualitativeEvaluation(flag, yes)])
    path = outlined["folder"] / "flagged.dcm"
    sr.save_as(path, enforce_file_format=True)
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert groups and all(g.get_qualitative_evaluations(name=flag) for g in groups)
    assert dciodvfy_errors(path) == []
