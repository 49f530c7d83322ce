"""Lumbar levels from a labelled SEG in the study (issue 5): slices take the disc or vertebral body
a SEG of vertebrae/discs on the same frame of reference labels there, and nothing else; a SEG on
another frame of reference and this node's own muscle SEG are ignored and the method says why;
the per-level measures reach measurements.csv, the SR (dciodvfy, tid1500reader, highdicom,
dcmjs) and the PDF report.

The synthetic study (``make_synthetic_study(level_seg=True)``) draws the SEG from the phantom's
spine, so every disc's and vertebral body's z range is known; the axial slices are untilted
except in the disc-angled study.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from dataclasses import replace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from app.config import load_config
from dicom_validators import bytes_without_dates, dciodvfy_errors, dcmjs_read, dcmqi_read_sr
from paraspinal.dicom_index import StudyRecord, index_folder
from paraspinal.dicom_outputs import build_measurement_report, build_segmentation, content_key
from paraspinal.levels import (LEVEL_UNKNOWN_REASON, LabelledStructure, StudyLevelSources, _order_problem,
                               determine_levels, level_from_text, level_sort_key, segment_level, spine_level)
from paraspinal.quantification import measure_stack
from paraspinal.report_pdf import ReportContext, ReportStack, _count_pages, render_report_pdf
from paraspinal.results_folder import measurement_rows, rows_to_csv
from paraspinal.series_selection import select_series
from paraspinal.stacks import load_stack
from paraspinal.synthetic_study import add_level_seg, make_synthetic_study
from test_measurements import stand_in_bundle

VOXEL_Z_MM = 1.25  # the labelled sagittal's row spacing along z


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One axial T2 (40 slices, z -86..+86) and, in the same study folder: the full spine SEG
    (series 21), a SEG of two discs only (31), a full SEG on another frame of reference (41), and
    this node's own muscle SEG of the axial stack."""
    root = tmp_path_factory.mktemp("levels")
    bundle = stand_in_bundle()
    config = load_config(environ={})
    synthetic = make_synthetic_study(root / "in", seed=3, rows=160, cols=160, n_slices=40, slice_spacing=4.4,
                                     include_distractors=False, level_seg=True)
    full = synthetic.level_segs[0]
    partial = add_level_seg(synthetic, levels=("L2/L3", "L4/L5"), series_number=30, description="two discs")
    other = add_level_seg(synthetic, frame_of_reference_uid=pydicom.uid.generate_uid(), series_number=40,
                          description="other frame")
    (record,) = index_folder(root / "in").studies.values()
    selection = select_series(record, config.selection)
    assert selection.chosen.series_uid == synthetic.t2_series_uid
    (plan,) = selection.chosen.stacks
    stack = load_stack(plan, selection.chosen.series_uid, 1)
    order = {uid: k for k, uid in enumerate(synthetic.stacks[0].sop_instance_uids)}
    index = [order[str(ds.SOPInstanceUID)] for ds in stack.datasets]
    labels = synthetic.stacks[0].labels[index]
    own = build_segmentation(stack, labels, bundle, config.output)
    (root / "in" / "own").mkdir()
    own.dataset.save_as(root / "in" / "own" / "seg.dcm", enforce_file_format=True)
    (record,) = index_folder(root / "in").studies.values()  # now with our own SEG too
    z = [float((stack.affine_lps @ np.array([79.5, 79.5, k, 1.0]))[2]) for k in range(stack.n_slices)]
    return {"root": root, "synthetic": synthetic, "record": record, "stack": stack, "labels": labels, "z": z,
            "full": full, "partial": partial, "other": other, "own": own, "bundle": bundle, "config": config}


def _only(record: StudyRecord, *keep_series: str, drop: tuple[str, ...] = ()) -> StudyRecord:
    """The study with only the axial T2 and the given series (or without those in ``drop``)."""
    series = {uid: s for uid, s in record.series.items()
              if (not keep_series or uid in keep_series or s.first.Modality == "MR") and uid not in drop}
    return StudyRecord(record.study_uid, series)


def _own_series(study) -> str:
    return str(study["own"].dataset.SeriesInstanceUID)


def _expected(z: float, ranges: dict[str, tuple[float, float]], tol: float) -> set:
    """The levels the rule may give a slice at ``z`` (one element where it is certain): a structure
    surely meets the slice when its z range is within ``tol`` less one voxel of z, surely not
    beyond ``tol`` (the labelled voxels sample the ranges every 1.25 mm along z)."""

    def distance(lo: float, hi: float) -> float:
        return 0.0 if lo <= z < hi else min(abs(z - lo), abs(z - hi))

    sure = {n for n, r in ranges.items() if distance(*r) <= tol - VOXEL_Z_MM}
    maybe = {n for n, r in ranges.items() if distance(*r) <= tol}
    discs_sure, discs_maybe = {n for n in sure if "/" in n}, {n for n in maybe if "/" in n}
    vertebrae_sure, vertebrae_maybe = sure - discs_sure, maybe - discs_maybe
    if discs_sure:
        return discs_maybe
    if discs_maybe:
        return discs_maybe | vertebrae_maybe | (set() if vertebrae_sure else {None})
    if vertebrae_sure:
        return vertebrae_maybe
    return vertebrae_maybe | {None}


def _tolerance(stack) -> float:
    return max(0.5 * float(stack.datasets[0].SliceThickness), 0.5 * VOXEL_Z_MM)


# --- assigning levels ------------------------------------------------------------------------------

def test_each_slice_takes_the_disc_else_the_vertebral_body_labelled_there(study):
    record = _only(study["record"], study["full"].seg_series_uid)
    levels = StudyLevelSources(record).levels_for(study["stack"], study["labels"])
    assert levels.determined and len(levels.levels) == study["stack"].n_slices
    assert "SEG 'spine labels' (series 21)" in levels.method and "same frame of reference" in levels.method
    assert levels.sources[0]["sop_instance_uid"] == study["full"].seg_sop_instance_uid
    tol = _tolerance(study["stack"])
    certain = 0
    for k, (z, level) in enumerate(zip(study["z"], levels.levels)):
        expected = _expected(z, study["full"].z_ranges, tol)
        assert level in expected, (k, z, level, expected)
        certain += len(expected) == 1
    assert certain >= 30  # most slices are far from a boundary
    # every labelled level that the stack spans is found, head to feet in slice order (ascending z)
    seen = [lv for lv in levels.levels if lv]
    assert {"L1/L2", "L2", "L2/L3", "L3", "L3/L4", "L4", "L4/L5", "L5", "L5/S1", "S1"} <= set(seen)
    order = [spine_level(lv) for lv in dict.fromkeys(reversed(seen))]
    assert [level_sort_key(lv.name) for lv in order] == sorted(level_sort_key(lv.name) for lv in order)


def test_levels_are_never_interpolated_between_or_beyond_labelled_structures(study):
    record = _only(study["record"], study["partial"].seg_series_uid)
    levels = StudyLevelSources(record).levels_for(study["stack"], study["labels"])
    ranges = study["partial"].z_ranges
    tol = _tolerance(study["stack"])
    assert set(levels.levels) == {None, "L2/L3", "L4/L5"}
    for z, level in zip(study["z"], levels.levels):
        assert level in _expected(z, ranges, tol), (z, level)
        lo, hi = min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values())
        if z < lo - tol or z > hi + tol or ranges["L4/L5"][1] + tol < z < ranges["L2/L3"][0] - tol:
            assert level is None  # beyond the labelled discs, and between them (L3, L4 not labelled)


def test_seg_on_another_frame_of_reference_is_ignored_and_the_method_says_why(study):
    record = _only(study["record"], study["other"].seg_series_uid)
    levels = StudyLevelSources(record).levels_for(study["stack"], study["labels"])
    assert levels.levels == [None] * study["stack"].n_slices and not levels.determined
    assert "level unknown" in levels.method and "another frame of reference" in levels.method
    assert "'other frame'" in levels.method and "slice position" in levels.method
    # with the usable SEG beside it, the levels come from that one and the other is still named
    both = _only(study["record"], study["other"].seg_series_uid, study["full"].seg_series_uid)
    levels = StudyLevelSources(both).levels_for(study["stack"], study["labels"])
    assert levels.determined and "'other frame'" in levels.method and "another frame of reference" in levels.method
    assert [s["series_description"] for s in levels.sources] == ["spine labels"]


def test_this_nodes_own_muscle_seg_is_ignored(study):
    own_only = _only(study["record"], _own_series(study))
    levels = StudyLevelSources(own_only).levels_for(study["stack"], study["labels"])
    assert not levels.determined and "none of its segments is a vertebra or intervertebral disc" in levels.method
    with_full = _only(study["record"], _own_series(study), study["full"].seg_series_uid)
    alone = StudyLevelSources(_only(study["record"], study["full"].seg_series_uid))
    assert (StudyLevelSources(with_full).levels_for(study["stack"], study["labels"]).levels
            == alone.levels_for(study["stack"], study["labels"]).levels)


def test_without_a_labelled_source_every_slice_is_reported_by_position(study):
    record = _only(study["record"], "none")
    levels = StudyLevelSources(record).levels_for(study["stack"], study["labels"])
    assert levels == determine_levels(study["stack"].n_slices)
    assert levels.method == LEVEL_UNKNOWN_REASON and "slice position" in levels.method


def test_disc_angled_stacks_take_their_disc_at_the_centre_slice(tmp_path):
    synthetic = make_synthetic_study(tmp_path / "in", seed=5, rows=160, cols=160, oblique_stacks=True,
                                     include_distractors=False, level_seg=True)
    (record,) = index_folder(tmp_path / "in").studies.values()
    selection = select_series(record, load_config(environ={}).selection)
    sources = StudyLevelSources(record)
    truth = {uid: (s.level, k) for s in synthetic.stacks for k, uid in enumerate(s.sop_instance_uids)}
    for i, plan in enumerate(selection.chosen.stacks, start=1):
        stack = load_stack(plan, selection.chosen.series_uid, i)
        levels = sources.levels_for(stack).levels
        for ds, level in zip(stack.datasets, levels):
            disc, k = truth[str(ds.SOPInstanceUID)]
            if k == 2:  # the slice through the disc centre
                assert level == disc, (disc, levels)
            assert level is not None
            assert level == disc or "/" not in level  # never another disc


def test_mislabelled_source_out_of_anatomical_order_is_refused():
    spacing = np.eye(3)
    l3 = LabelledStructure(spine_level("L3"), np.array([[0.0, 0.0, -40.0]]), spacing)
    l4 = LabelledStructure(spine_level("L4"), np.array([[0.0, 0.0, 0.0]]), spacing)
    assert "not in anatomical order" in _order_problem([l3, l4])
    assert _order_problem([replace(l3, points_lps=np.array([[0.0, 0.0, 40.0]])), l4]) == ""


@pytest.mark.parametrize("text, name", [
    ("L4", "L4"), ("vertebrae_L4", "L4"), ("L4 vertebra", "L4"), ("S1", "S1"), ("T12 vertebral body", "T12"),
    ("L4/L5", "L4/L5"), ("L4-L5", "L4/L5"), ("L4-5", "L4/L5"), ("disc_L5_S1", "L5/S1"), ("L5-S1 disc", "L5/S1"),
    ("T12/L1", "T12/L1"), ("intervertebral disc L3/L4", "L3/L4"),
    ("L4/L6", None), ("L6", None), ("psoas L4", None), ("multifidus right", None), ("", None), ("L3/L2", None),
])
def test_segment_label_text_names_a_level_only_exactly(text, name):
    level = level_from_text(text)
    assert (level.name if level else None) == name


def _segment(label: str, code: tuple[str, str, str], region: tuple[str, str, str] | None = None) -> Dataset:
    item = Dataset()
    item.SegmentNumber = 1
    item.SegmentLabel = label
    ptype = Dataset()
    ptype.CodeValue, ptype.CodingSchemeDesignator, ptype.CodeMeaning = code
    item.SegmentedPropertyTypeCodeSequence = [ptype]
    if region:
        anat = Dataset()
        anat.CodeValue, anat.CodingSchemeDesignator, anat.CodeMeaning = region
        item.AnatomicRegionSequence = [anat]
    return item


def test_segments_are_recognised_by_code_first_and_by_label_only_as_a_fallback():
    assert segment_level(_segment("whatever", ("84020006", "SCT", "L4/L5 disc"))) == (spine_level("L4/L5"), "code")
    assert segment_level(_segment("x", ("T-11940", "SRT", "L4 vertebra"))) == (spine_level("L4"), "code")
    assert segment_level(_segment("x", ("65985001", "SCT", "S1 vertebra"))) == (spine_level("S1"), "code")
    generic = _segment("vertebra 3", ("51282000", "SCT", "Vertebra"), ("36470004", "SCT", "L3 vertebra"))
    assert segment_level(generic) == (spine_level("L3"), "code")
    disc = _segment("d", ("0000", "99LOCAL", "Intervertebral disc"), ("62551000", "SCT", "L3/L4 disc"))
    assert segment_level(disc) == (spine_level("L3/L4"), "code")
    # a region code of the wrong kind does not make a vertebra a disc
    assert segment_level(_segment("d", ("51282000", "SCT", "Vertebra"), ("62551000", "SCT", "L3/L4 disc")))[0] is None
    assert segment_level(_segment("L2", ("51282000", "SCT", "Vertebra"))) == (spine_level("L2"), "label")
    assert segment_level(_segment("multifidus right", ("5709001", "SCT", "Multifidus muscles")))[0] is None


# --- carrying the levels through ---------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(study):
    record = _only(study["record"], study["full"].seg_series_uid, _own_series(study))
    levels = StudyLevelSources(record).levels_for(study["stack"], study["labels"])
    measures = measure_stack(study["stack"], study["labels"], study["bundle"].labels, "signal_fraction",
                             levels=levels)
    return {"levels": levels, "measures": measures}


def test_per_level_measures_are_the_means_over_the_slices_at_that_level(measured):
    levels = measured["levels"]
    for m in measured["measures"]:
        assert m.slice_level == levels.levels and m.level_method == levels.method
        assert m.level_sources == levels.sources
        assert [lm.level for lm in m.level_measures] == sorted(
            {lv for k, lv in enumerate(levels.levels) if lv and m.slice_csa_mm2[k] > 0}, key=level_sort_key)
        for lm in m.level_measures:
            ks = [k for k, lv in enumerate(levels.levels) if lv == lm.level and m.slice_csa_mm2[k] > 0]
            assert lm.slices == ks and lm.n_slices_with_muscle == len(ks)
            assert lm.kind == ("disc" if "/" in lm.level else "vertebra")
            assert lm.mean_csa_mm2 == pytest.approx(np.mean([m.slice_csa_mm2[k] for k in ks]), abs=0.01)
            fat = sum(m.slice_fat_csa_mm2[k] for k in ks) / sum(m.slice_csa_mm2[k] for k in ks)
            assert lm.fat_fraction_pct == pytest.approx(100 * fat, abs=0.01)
    psoas = next(m for m in measured["measures"] if m.muscle == "psoas major")
    names = [lm.level for lm in psoas.level_measures]
    assert names.index("L3") < names.index("L3/L4") < names.index("L4")  # head to feet


def test_measurements_csv_has_a_row_per_level_after_each_stack_row(study, measured):
    stacks = [{"series_instance_uid": study["stack"].series_uid,
               "measurements": [m.as_dict() for m in measured["measures"]]}]
    rows = list(csv.DictReader(io.StringIO(rows_to_csv(measurement_rows("1.2.3", stacks)))))
    m = measured["measures"][0]
    mine = [r for r in rows if r["label"] == str(m.label)]
    assert mine[0]["level"] == "" and mine[0]["volume_cm3"] == str(m.volume_cm3)
    assert [r["level"] for r in mine[1:]] == [lm.level for lm in m.level_measures]
    assert [float(r["mean_csa_mm2"]) for r in mine[1:]] == [lm.mean_csa_mm2 for lm in m.level_measures]
    assert all(r["volume_cm3"] == "" for r in mine[1:])


def test_sr_per_level_groups_pass_dciodvfy_and_read_back(study, measured, tmp_path):
    stack, config, bundle = study["stack"], study["config"], study["bundle"]
    seg = build_segmentation(stack, study["labels"], bundle, config.output)
    sr_path = tmp_path / "sr.dcm"
    build_measurement_report([(stack, seg, measured["measures"])], bundle, config.output).save_as(
        sr_path, enforce_file_format=True)
    assert dciodvfy_errors(sr_path) == []

    groups = {g["TrackingIdentifier"]: g for g in dcmqi_read_sr(sr_path, tmp_path)["Measurements"]}
    n_levels = sum(len(m.level_measures) for m in measured["measures"])
    n_slices = sum(len(m.present_slices) for m in measured["measures"])
    outlines = [t for t in groups if "," in t]  # "<muscle> <side>, L4/L5": one per key slice and muscle
    where = [t.split(", ")[1] for t in outlines]  # by level where known, else by slice (a ~30 mm band)
    levels = {lm.level for m in measured["measures"] for lm in m.level_measures}
    assert any(w in levels for w in where) and all(w in levels or w.startswith("slice ") for w in where)
    assert len(groups) == len(measured["measures"]) + n_levels + n_slices + len(outlines)
    for m in measured["measures"]:
        for lm in m.level_measures:
            group = groups[f"stack 1 {m.name} level {lm.level}"]
            assert group["ReferencedSegment"] == seg.segment_numbers[m.label]
            items = {i["quantity"]["CodeValue"]: (float(i["value"]), i["units"]["CodeValue"])
                     for i in group["measurementItems"]}
            assert items["42798000"] == (pytest.approx(lm.mean_csa_mm2), "mm2")
            assert items["129100"] == (pytest.approx(lm.fat_fraction_pct), "%")
        k = next(k for k in m.present_slices if m.slice_level[k])
        assert f"stack 1 {m.name} slice {k + 1} level {m.slice_level[k]}" in groups

    sr = hd.sr.srread(sr_path)
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    level_groups = [g for g in volumetric if " level " in g.tracking_identifier]
    assert len(level_groups) == n_levels
    for group in level_groups:
        level = group.tracking_identifier.rsplit(" level ", 1)[1]
        value, scheme, meaning = spine_level(level).site_code()
        sites = [(s.value.value, s.value.meaning) for s in group.finding_sites]
        assert (value, meaning) in sites and len(sites) == 2
        if "/" in level:
            assert meaning.startswith("Level of ") and meaning.endswith("intervertebral disc")
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.dataset.SOPInstanceUID
        source_uids = {s.referenced_sop_instance_uid for s in reference.source_images_for_segmentation}
        name = group.tracking_identifier.split("stack 1 ", 1)[1].rsplit(" level ", 1)[0]
        m = next(x for x in measured["measures"] if x.name == name)
        lm = next(x for x in m.level_measures if x.level == level)
        assert source_uids == {str(stack.datasets[k].SOPInstanceUID) for k in lm.slices}

    js = dcmjs_read(sr_path)["sr"]
    assert len(js["measurementGroups"]) == len(groups)


def test_sr_light_content_path_equals_the_full_content_with_level_groups(study, measured):
    from paraspinal import dicom_outputs

    stack, config, bundle = study["stack"], study["config"], study["bundle"]
    seg = build_segmentation(stack, study["labels"], bundle, config.output)
    results = [(stack, seg, measured["measures"])]

    fast = dicom_outputs.build_measurement_report(results, bundle, config.output)
    reference = dicom_outputs.build_measurement_report(results, bundle, config.output, light_content=False)
    assert bytes_without_dates(fast) == bytes_without_dates(reference)


@pytest.mark.skipif(shutil.which("pdftoppm") is None or shutil.which("pdftotext") is None,
                    reason="poppler-utils (pdftoppm, pdftotext) not installed")
def test_report_has_a_per_level_table_and_a_key_image_per_level(study, measured, tmp_path):
    bundle, stack = study["bundle"], study["stack"]
    ctx = ReportContext(bundle.name, bundle.version, bundle.weights_sha256, "signal_fraction", "none", "0.1.0")
    stacks = [ReportStack(stack, study["labels"], measured["measures"])]
    path = tmp_path / "report.pdf"
    path.write_bytes(render_report_pdf(stack.datasets[0], stacks, bundle.labels, ctx))
    subprocess.run(["pdftoppm", "-png", "-r", "30", str(path), str(tmp_path / "page")], check=True)
    assert len(sorted(tmp_path.glob("page-*.png"))) == _count_pages(stacks)

    def text(page: int) -> str:
        out = subprocess.run(["pdftotext", "-layout", "-f", str(page), "-l", str(page), str(path), "-"],
                             capture_output=True, text=True, check=True).stdout
        return " ".join(out.split())

    assert "levels from SEG 'spine labels'" in text(1)
    table = text(2)
    assert "Per lumbar level, stack 1" in table
    psoas = next(m for m in measured["measures"] if m.muscle == "psoas major" and m.side == "right")
    for lm in psoas.level_measures:
        assert lm.level in table and f"{lm.mean_csa_mm2:.0f} / {lm.fat_fraction_pct:.1f}" in table
    keys = " ".join(text(p) for p in range(3, _count_pages(stacks) + 1))
    levels = {lm.level for m in measured["measures"] for lm in m.level_measures}
    for level in levels:
        assert f"Stack 1, level {level}:" in keys
    assert "lumbar level not determined" not in keys  # every slice with muscle has a level here


def test_a_level_source_gives_the_sr_new_uids_while_the_same_analysis_keeps_them(study, measured):
    """Resending an identical analysis is idempotent at the PACS (same UIDs); an analysis that
    changed because a level SEG arrived must not reuse the SR's SOP Instance UID for new content."""
    stack, config, bundle = study["stack"], study["config"], study["bundle"]
    seg = build_segmentation(stack, study["labels"], bundle, config.output)
    without = measure_stack(stack, study["labels"], bundle.labels, "signal_fraction")
    sr_levels = build_measurement_report([(stack, seg, measured["measures"])], bundle, config.output)
    sr_levels_again = build_measurement_report([(stack, seg, measured["measures"])], bundle, config.output)
    sr_plain = build_measurement_report([(stack, seg, without)], bundle, config.output)
    assert sr_levels.SOPInstanceUID == sr_levels_again.SOPInstanceUID
    assert sr_levels.SOPInstanceUID != sr_plain.SOPInstanceUID
    assert sr_levels.SeriesInstanceUID != sr_plain.SeriesInstanceUID
    assert content_key(measured["measures"]) != content_key(without)


def test_per_level_dixon_pdff_has_its_own_sr_group_that_passes_dciodvfy(study, measured, tmp_path):
    """Where a level's slices have a Dixon PDFF, the SR carries it per level too, in a group of
    its own with the Dixon method (like the stack's PDFF group)."""
    stack, config, bundle = study["stack"], study["config"], study["bundle"]
    seg = build_segmentation(stack, study["labels"], bundle, config.output)
    measures = [replace(m, level_measures=[replace(lm, pdff_pct=10.0 + i)
                                                       for i, lm in enumerate(m.level_measures)])
                for m in measured["measures"]]
    sr_path = tmp_path / "sr.dcm"
    build_measurement_report([(stack, seg, measures)], bundle, config.output).save_as(sr_path, enforce_file_format=True)
    assert dciodvfy_errors(sr_path) == []
    groups = {g["TrackingIdentifier"]: g for g in dcmqi_read_sr(sr_path, tmp_path)["Measurements"]}
    for m in measures:
        for i, lm in enumerate(m.level_measures):
            group = groups[f"stack 1 {m.name} level {lm.level} PDFF"]
            assert group["ReferencedSegment"] == seg.segment_numbers[m.label]
            (item,) = group["measurementItems"]
            assert float(item["value"]) == pytest.approx(10.0 + i) and item["units"]["CodeValue"] == "%"
