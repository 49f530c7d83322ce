"""Measurements: the fat methods on muscles of known fat fraction, the outlier rule, the
continuous method's references, asymmetry and Goutallier definitions, Dixon detection and PDFF
on the real MyoSegmenTUM case, and the SR that carries it all (dciodvfy, dcmqi, dcmjs).

The label table comes from ``training/labels.json`` (the table every bundle carries), with a
stand-in bundle object: the SR and SEG need names, codes and colours, not weights.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset

from app.config import ConfigError, load_config
from dicom_validators import dciodvfy_errors, dcmjs_read, dcmqi_read_sr
from paraspinal.dicom_index import InstanceRecord, SeriesRecord, index_folder
from paraspinal.dicom_outputs import build_measurement_report, build_segmentation
from paraspinal.dicom_series_writer import axial_stack_geometry
from paraspinal.dixon import dixon_kind, find_dixon_pair, pdff_on_stack, resample_to_stack
from paraspinal.fat_methods import (FAT_METHODS, FatInput, fat_signal_share, linear_fat_share, n4_bias_correct,
                                    run_otsu_outlier, separate_fat, signal_fraction_references)
from paraspinal.model_bundle import ModelBundle, parse_labels
from paraspinal.phantom import LumbarPhantom
from paraspinal.quality import CHECKS
from paraspinal.quantification import asymmetry_index, goutallier_grade, measure_stack
from paraspinal.series_selection import judge_series, select_series
from paraspinal.stacks import StackVolume, load_stack
from paraspinal.synthetic_study import make_synthetic_study
from tests.conftest import ROOT

LABELS_JSON = ROOT / "training" / "labels.json"
PIXEL = (1.2, 1.2)


def stand_in_bundle() -> ModelBundle:
    labels = parse_labels(json.loads(LABELS_JSON.read_text()))
    return ModelBundle(path=LABELS_JSON.parent, name="paraspinal-test-labels", version="0.0.0-test", metadata={},
                       labels=labels, preprocessing=None, postprocessing=None, num_classes=len(labels) + 1,
                       network=None, device=torch.device("cpu"), weights_sha256="0" * 64, lock=threading.Lock())


@pytest.fixture(scope="module")
def bundle_labels():
    return stand_in_bundle()


def render(seed: int = 7, *, noise: float = 10.0, bias: float = 0.3):
    phantom = LumbarPhantom(seed)
    geometry = axial_stack_geometry(6, 160, 160, PIXEL, 5.0, origin_lps=(0.0, phantom.spine_y0 + 25.0, 0.0))
    return phantom.render(geometry, contrast="t2", noise_sigma=noise, bias_field_strength=bias)


@pytest.fixture(scope="module")
def phantom():
    return render()


def fat_fraction_errors_pp(share: np.ndarray, rendering) -> dict[int, float]:
    truth = rendering.fat_fractions
    return {label: 100.0 * (float(share[rendering.labels == label].mean()) - truth[label]) for label in truth}


# --- the methods on muscles of known fat fraction ---------------------------------------------

@pytest.mark.parametrize("method", ["otsu", "kmeans", "gmm", "signal_fraction"])
def test_methods_recover_the_true_fat_fraction(phantom, method):
    """Pure voxels (no partial volume), Rician noise, a coil bias field: truth within 1.5 pp."""
    result = separate_fat(phantom.image, phantom.labels, range(1, 9), method, PIXEL)
    errors = fat_fraction_errors_pp(result.share, phantom)
    assert max(abs(e) for e in errors.values()) <= 1.5, errors


def test_outlier_corrected_otsu_recovers_the_true_fat_fraction_after_n4(phantom):
    """With the coil field the muscles' thresholds differ for a reason (depth), and the outlier
    rule replaces good thresholds (+9 pp on erector spinae L here, see README); after N4 it holds."""
    corrected = n4_bias_correct(phantom.image, (5.0, *PIXEL))
    result = separate_fat(corrected, phantom.labels, range(1, 9), "otsu_outlier", PIXEL)
    errors = fat_fraction_errors_pp(result.share, phantom)
    assert max(abs(e) for e in errors.values()) <= 1.5, errors


def test_signal_fraction_is_exact_without_noise():
    clean = render(noise=0.0, bias=0.0)
    errors = fat_fraction_errors_pp(separate_fat(clean.image, clean.labels, range(1, 9), "signal_fraction",
                                                 PIXEL).share, clean)
    assert max(abs(e) for e in errors.values()) <= 0.01, errors


def test_signal_fraction_references_are_the_muscle_and_subcutaneous_fat_signals():
    clean = render(noise=0.0, bias=0.0)  # T2 phantom: muscle 200, fat 900
    inp = FatInput(clean.image, clean.labels, tuple(range(1, 9)), PIXEL)
    lean, fat, notes = signal_fraction_references(inp)
    assert notes == []
    assert all(v == pytest.approx(900.0, abs=1.0) for v in fat)
    assert all(v == pytest.approx(200.0, abs=1.0) for values in lean.values() for v in values if v is not None)


def test_signal_fraction_share_is_0_at_the_lean_reference_and_1_at_the_fat_reference():
    values = np.array([150.0, 200.0, 375.0, 550.0, 900.0, 1200.0])
    share = linear_fat_share(values, lean=200.0, fat=900.0)
    assert share[1] == 0.0 and share[4] == 1.0
    assert share[0] == 0.0 and share[5] == 1.0  # clipped outside the references
    assert share[2] == pytest.approx(0.25) and share[3] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        linear_fat_share(values, lean=900.0, fat=200.0)
    # The diagnostic signal-weighted share (not a product method) also runs 0 -> 1, but weights
    # fat by its brightness: half fat by volume is 900 / (900 + 200) of the signal.
    weighted = fat_signal_share(values, lean=200.0, fat=900.0)
    assert weighted[1] == 0.0 and weighted[4] == 1.0
    assert weighted[3] == pytest.approx(900 / 1100, abs=1e-6)


def test_signal_fraction_uses_the_references_of_each_slice(phantom):
    inp = FatInput(phantom.image, phantom.labels, tuple(range(1, 9)), PIXEL)
    result = FAT_METHODS["signal_fraction"].run(inp)
    k = 3
    lean, fat = result.lean_reference[3][k], result.fat_reference[k]
    mask = phantom.labels[k] == 3
    values = phantom.image[k][mask]
    np.testing.assert_allclose(result.share[k][mask], linear_fat_share(values, lean, fat))


def _infiltrated(rng, n: int, lean: float, fat_fraction: float) -> np.ndarray:
    """Lean peak plus fat spread over partial-volume intensities up to pure fat."""
    n_fat = int(round(n * fat_fraction))
    return np.concatenate([rng.normal(lean, 15.0, n - n_fat), rng.uniform(300.0, 900.0, n_fat)])


def test_outlier_correction_replaces_an_outlying_threshold_with_the_others_mean():
    rng = np.random.default_rng(0)
    labels = np.zeros((1, 60, 60), dtype=np.uint8)
    image = np.zeros((1, 60, 60), dtype=np.float32)
    for label in range(1, 6):
        labels[0, (label - 1) * 12:(label - 1) * 12 + 12, :] = label
    leans = {1: 190.0, 2: 200.0, 3: 210.0, 4: 205.0}
    for label, lean in leans.items():
        image[labels == label] = _infiltrated(rng, 720, lean, 0.3)
    # Label 5 holds no fat: Otsu still splits its noise (threshold ~200, far below the others' ~430).
    image[labels == 5] = rng.normal(200.0, 15.0, 720)
    plain = separate_fat(image, labels, (1, 2, 3, 4, 5), "otsu")
    assert float(plain.share[labels == 5].mean()) > 0.3  # Otsu's known overcall on a lean muscle
    result = run_otsu_outlier(FatInput(image, labels, (1, 2, 3, 4, 5)))
    assert result.replaced[5] == [0]
    assert all(result.replaced[label] == [] for label in leans)
    others = [result.thresholds[label][0] for label in leans]
    assert result.thresholds[5][0] == pytest.approx(float(np.mean(others)))
    assert float(result.share[labels == 5].mean()) == 0.0  # corrected: the lean muscle holds no fat
    # Fewer than three other muscles on the slice: nothing to compare with, nothing replaced.
    few = run_otsu_outlier(FatInput(image, np.where(labels >= 3, labels, 0), (3, 4, 5)))
    assert few.replaced == {3: [], 4: [], 5: []}


# --- definitions --------------------------------------------------------------------------------

def test_asymmetry_index_is_the_difference_over_the_mean_of_both_sides():
    assert asymmetry_index(100.0, 100.0) == 0.0
    assert asymmetry_index(150.0, 50.0) == pytest.approx(100.0)
    assert asymmetry_index(50.0, 150.0) == pytest.approx(100.0)
    assert asymmetry_index(80.0, 0.0) == pytest.approx(200.0)
    assert asymmetry_index(0.0, 0.0) is None and asymmetry_index(None, 10.0) is None


@pytest.mark.parametrize("ff, grade", [(0.0, "normal/mild"), (9.99, "normal/mild"), (10.0, "moderate"),
                                       (30.0, "moderate"), (50.0, "moderate"), (50.01, "severe"),
                                       (100.0, "severe"), (None, None)])
def test_goutallier_grade_boundaries(ff, grade):
    assert goutallier_grade(ff) == grade


def test_config_defaults_and_unknown_method_fails_early():
    q = load_config(environ={}).quantification
    assert (q.fat_method, q.bias_correction, q.dixon_pdff) == ("signal_fraction", "n4", "auto")
    with pytest.raises(ConfigError, match="fat_method.*otsu"):
        load_config(environ={"PARASPINAL__QUANTIFICATION__FAT_METHOD": "threshold"})
    with pytest.raises(ConfigError, match="bias_correction"):
        load_config(environ={"PARASPINAL__QUANTIFICATION__BIAS_CORRECTION": "yes"})


# --- a synthetic DICOM stack through measure_stack and the SR -----------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, bundle_labels):
    root = tmp_path_factory.mktemp("synthetic")
    study = make_synthetic_study(root / "in", seed=5, rows=160, cols=160, n_slices=6, include_distractors=False)
    (record,) = index_folder(root / "in").studies.values()
    selection = select_series(record, load_config(environ={}).selection)
    (plan,) = selection.chosen.stacks
    stack = load_stack(plan, selection.chosen.series_uid, 1)
    truth = {uid: k for k, uid in enumerate(study.stacks[0].sop_instance_uids)}
    order = [truth[str(ds.SOPInstanceUID)] for ds in stack.datasets]
    labels = study.stacks[0].labels[order]
    fat = study.stacks[0].fat_mask[order]
    # A PDFF map standing in for Dixon: 95 % in fat voxels, 2 % elsewhere.
    pdff = np.where(fat, 0.95, 0.02).astype(np.float32)
    measures = measure_stack(stack, labels, bundle_labels.labels, "signal_fraction", pdff=pdff,
                             pdff_source={"water_series_instance_uid": "1.2.3", "fat_series_instance_uid": "1.2.4"})
    return {"root": root, "stack": stack, "labels": labels, "fat": fat, "pdff": pdff, "measures": measures}


def test_measure_stack_reports_every_measure_per_slice_and_per_stack(synthetic):
    stack, labels, measures = synthetic["stack"], synthetic["labels"], synthetic["measures"]
    assert all(m.found for m in measures)
    for m in measures:
        for k in range(stack.n_slices):
            assert m.slice_fat_csa_mm2[k] + m.slice_lean_csa_mm2[k] == pytest.approx(m.slice_csa_mm2[k], abs=0.02)
            if m.slice_csa_mm2[k] > 0:
                assert m.slice_fat_fraction_pct[k] == pytest.approx(
                    100 * m.slice_fat_csa_mm2[k] / m.slice_csa_mm2[k], abs=0.05)
        assert m.volume_cm3 == pytest.approx((labels == m.label).sum() * stack.voxel_volume_mm3 / 1000, rel=1e-3)
        assert m.goutallier_grade == goutallier_grade(m.fat_fraction_pct)
        mask = labels == m.label
        assert m.pdff_pct == pytest.approx(100 * float(synthetic["pdff"][mask].mean()), abs=0.01)
        # Levels are never guessed: unknown, reported by slice position.
        assert m.slice_level == [None] * stack.n_slices and "slice position" in m.level_method
    by = {(m.muscle, m.side): m for m in measures}
    for muscle in {m.muscle for m in measures}:
        right, left = by[(muscle, "right")], by[(muscle, "left")]
        assert right.asymmetry_index_pct == left.asymmetry_index_pct == pytest.approx(
            asymmetry_index(right.volume_cm3, left.volume_cm3), abs=0.01)


def test_no_asymmetry_index_when_one_side_is_not_found(synthetic, bundle_labels):
    labels = np.where(synthetic["labels"] == 2, 0, synthetic["labels"])  # multifidus L missing
    measures = {m.label: m for m in measure_stack(synthetic["stack"], labels, bundle_labels.labels, "otsu")}
    assert not measures[2].found
    assert measures[1].asymmetry_index_pct is None and measures[2].asymmetry_index_pct is None
    assert measures[3].asymmetry_index_pct is not None
    # the missing side is flagged for review, naming the other side
    assert measures[2].quality.review_recommended and measures[2].quality.checks == ["one_side"]
    assert "one_side" not in measures[1].quality.checks


def test_multifidus_missing_on_both_sides_is_flagged_for_review(synthetic, bundle_labels):
    labels = np.where(np.isin(synthetic["labels"], (1, 2)), 0, synthetic["labels"])  # no multifidus at all
    measures = {m.label: m for m in measure_stack(synthetic["stack"], labels, bundle_labels.labels, "otsu")}
    for side in (1, 2):
        assert not measures[side].found
        assert measures[side].quality.review_recommended and measures[side].quality.checks == ["absent"]
        assert "may have failed" in measures[side].as_dict()["quality"]["reasons"][0]
    assert not measures[3].quality.checks  # erector spinae, found on both sides, unaffected


def _write_valid_sr(stack, labels, measures, bundle, tmp_path: Path):
    """SEG and SR of ``labels`` on ``stack``; the SR saved and dciodvfy-clean. Returns (SR path, SEG)."""
    config = load_config(environ={})
    seg = build_segmentation(stack, labels, bundle, config.output)
    sr_path = tmp_path / "sr.dcm"
    build_measurement_report([(stack, seg, measures)], bundle, config.output).save_as(sr_path, enforce_file_format=True)
    assert dciodvfy_errors(sr_path) == []
    return sr_path, seg


def test_sr_names_a_muscle_not_found_with_its_review_flag_for_every_reader(synthetic, bundle_labels, tmp_path):
    """A muscle the model did not find has no segment and no measurement, but a reader of the SR
    (not only of the PDF) must learn that the series may have failed: a TID 1501 group per side."""
    import highdicom as hd

    labels = np.where(np.isin(synthetic["labels"], (1, 2)), 0, synthetic["labels"])  # no multifidus at all
    measures = measure_stack(synthetic["stack"], labels, bundle_labels.labels, "otsu")
    sr_path, _ = _write_valid_sr(synthetic["stack"], labels, measures, bundle_labels, tmp_path)

    groups = {g["TrackingIdentifier"]: g for g in dcmqi_read_sr(sr_path, tmp_path)["Measurements"]}
    for side in ("right", "left"):
        group = groups[f"stack 1 multifidus {side} not found"]
        assert not group.get("measurementItems") and "ReferencedSegment" not in group
        evaluations = {item["conceptCode"]["CodeValue"]: item["conceptValue"]["CodeMeaning"]
                       for item in group["qualitativeEvaluations"]}
        assert evaluations == {"REVIEWREC": "Yes", "REVIEWWHY": CHECKS["absent"]}
    assert "stack 1 erector spinae right not found" not in groups  # found: its own volumetric group
    assert "stack 1 erector spinae right" in groups

    report = hd.sr.srread(sr_path).content  # highdicom: TID 1501 "image measurement" groups
    found = {str(g.tracking_identifier): g for g in report.get_image_measurement_groups()}
    assert set(found) == {"stack 1 multifidus right not found", "stack 1 multifidus left not found"}
    for group in found.values():
        assert group.finding_type.value == bundle_labels.label(1).code.value  # multifidus
        assert {(q.name.meaning, q.value.meaning) for q in group.get_qualitative_evaluations()} == {
            ("Review recommended", "Yes"), ("Reason for review", CHECKS["absent"])}
    assert len(dcmjs_read(sr_path)["sr"]["measurementGroups"]) == len(groups)


def test_sr_with_every_measure_passes_dciodvfy_and_reads_with_tid1500reader_and_dcmjs(synthetic, bundle_labels,
                                                                                          tmp_path):
    stack, labels, measures = synthetic["stack"], synthetic["labels"], synthetic["measures"]
    sr_path, seg = _write_valid_sr(stack, labels, measures, bundle_labels, tmp_path)

    groups = {g["TrackingIdentifier"]: g for g in dcmqi_read_sr(sr_path, tmp_path)["Measurements"]}
    n_slices = sum(len(m.present_slices) for m in measures)
    outlines = [t for t in groups if "," in t]  # "<muscle> <side>, slice K": the drawable groups, last
    assert outlines and all(f"stack 1 {m.name}" not in outlines for m in measures)
    # T2 + PDFF, per stack and per slice, and the outlines on the key slices
    assert len(groups) == 2 * len(measures) + 2 * n_slices + len(outlines)
    for tracking in outlines:
        quantities = {i["quantity"]["CodeValue"] for i in groups[tracking]["measurementItems"]}
        assert {"42798000", "129100", "PDFF"} <= quantities  # area, fat fraction, Dixon PDFF
    for m in measures:
        main = groups[f"stack 1 {m.name}"]
        assert main["measurementMethod"]["CodeValue"] == "FATSIGFRAC"
        assert main["ReferencedSegment"] == seg.segment_numbers[m.label]
        items = {(i["quantity"]["CodeValue"], i.get("derivationModifier", {}).get("CodeMeaning", "")): i
                 for i in main["measurementItems"]}
        assert float(items[("129100", "")]["value"]) == pytest.approx(m.fat_fraction_pct)
        assert items[("129100", "")]["units"]["CodeValue"] == "%"
        assert float(items[("ASYMIDX", "")]["value"]) == pytest.approx(m.asymmetry_index_pct)
        assert items[("118565006", "")]["units"]["CodeValue"] == "cm3"
        evaluations = {}
        for item in main["qualitativeEvaluations"]:
            evaluations.setdefault(item["conceptCode"]["CodeValue"], []).append(item["conceptValue"])
        (grade,) = evaluations["GOUTALLIER"]
        assert m.goutallier_grade.split("/")[0] in grade["CodeMeaning"].lower()
        # quality control: the review flag and one coded reason per check that fired
        (review,) = evaluations["REVIEWREC"]
        assert review["CodeMeaning"] == ("Yes" if m.quality.review_recommended else "No")
        assert [r["CodeMeaning"] for r in evaluations.get("REVIEWWHY", [])] == [
            CHECKS[key] for key in m.quality.checks]
        pdff = groups[f"stack 1 {m.name} PDFF"]
        assert pdff["measurementMethod"]["CodeValue"] == "DIXONPDFF"
        assert float(pdff["measurementItems"][0]["value"]) == pytest.approx(m.pdff_pct)
        k = m.present_slices[0]
        planar = groups[f"stack 1 {m.name} slice {k + 1} z {m.slice_z_mm[k]:+.1f} mm"]
        values = {i["quantity"]["CodeValue"]: (float(i["value"]), i["units"]["CodeValue"])
                  for i in planar["measurementItems"]}
        assert values["42798000"] == (pytest.approx(m.slice_csa_mm2[k]), "mm2")
        assert values["FATCSA"] == (pytest.approx(m.slice_fat_csa_mm2[k]), "mm2")
        assert values["LEANCSA"] == (pytest.approx(m.slice_lean_csa_mm2[k]), "mm2")
        assert values["129100"] == (pytest.approx(m.slice_fat_fraction_pct[k]), "%")

    sr = dcmjs_read(sr_path)["sr"]
    assert sr["templateIdentifier"] == "1500"
    assert len(sr["measurementGroups"]) == len(groups)
    slice_group = next(g for g in sr["measurementGroups"] if " slice " in g["trackingIdentifier"])
    assert slice_group["sourceImagesForSegmentation"][0]["sopInstanceUID"] in {
        str(ds.SOPInstanceUID) for ds in stack.datasets}


# --- Dixon --------------------------------------------------------------------------------------

def _series(image_type, description="", **extra) -> SeriesRecord:
    header = Dataset()
    header.ImageType = list(image_type)
    header.SeriesDescription = description
    header.Modality = "MR"
    for key, value in extra.items():
        setattr(header, key, value)
    return SeriesRecord("1.2.3", [InstanceRecord(Path("x.dcm"), header)])


@pytest.mark.parametrize("image_type, description, kind", [
    (("DERIVED", "PRIMARY", "DIXON", "WATER"), "t1_vibe_dixon_tra_W", "water"),  # Siemens
    (("DERIVED", "PRIMARY", "DIXON", "FAT"), "t1_vibe_dixon_tra_F", "fat"),
    (("ORIGINAL", "PRIMARY", "W", "W", "DERIVED"), "mDIXON", "water"),  # Philips mDIXON
    (("ORIGINAL", "PRIMARY", "F", "F", "DERIVED"), "mDIXON", "fat"),
    (("DERIVED", "PRIMARY", "FAT_FRACTION"), "t1_vibe_dixon_tra_FF", None),  # a fraction map, not a fat image
    (("DERIVED", "PRIMARY", "DIXON", "IN_PHASE"), "t1_vibe_dixon_tra_in", None),
    (("ORIGINAL", "PRIMARY", "M", "ND"), "t1_vibe_dixon_tra_W", "water"),  # ImageType silent: description
    (("ORIGINAL", "PRIMARY", "OTHER"), "WATER: Ax LAVA-Flex", "water"),  # GE naming
    (("ORIGINAL", "PRIMARY", "OTHER"), "FAT: Ax LAVA-Flex", "fat"),
    (("ORIGINAL", "PRIMARY", "M", "NORM"), "t2_tse_tra", None),
    (("ORIGINAL", "PRIMARY", "M", "NORM"), "t2_tse_tra_fs", None),
    (("DERIVED", "PRIMARY", "DIXON", "WATER"), "t1_vibe_dixon_tra_F", "water"),  # ImageType wins
])
def test_dixon_series_are_recognised_by_image_type_then_vendor_naming(image_type, description, kind):
    assert dixon_kind(_series(image_type, description))[0] == kind


def test_selector_never_takes_a_philips_style_dixon_water_image_as_the_t2(config):
    """An ORIGINAL Philips water image: its ImageType (W) rules it out before the timing is looked at."""
    series = _series(("ORIGINAL", "PRIMARY", "W", "W"), "mDIXON_W", EchoTime=1.2, RepetitionTime=5.8,
                     SOPClassUID="1.2.840.10008.5.1.4.1.1.4", ImagePositionPatient=[0, 0, 0],
                     ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[1, 1], Rows=64, Columns=64)
    decision = judge_series(series, config.selection)
    assert not decision.accepted and "Dixon water image" in decision.reason


@pytest.fixture(scope="module")
def dixon_case(tmp_path_factory, real_data):
    from tools.validate_fat import labels_in_stack_order, write_dixon_study

    root = tmp_path_factory.mktemp("dixon")
    written = write_dixon_study(real_data, root)
    case = written["case"]
    (study,) = index_folder(root).studies.values()
    selection = select_series(study, load_config(environ={}).selection)
    (plan,) = selection.chosen.stacks
    stack = load_stack(plan, selection.chosen.series_uid, 1)
    return {"case": case, "study": study, "selection": selection, "stack": stack,
            "labels": labels_in_stack_order(stack, case.paths, case.labels),
            "pdff_truth": labels_in_stack_order(stack, case.paths, case.pdff)}


def test_selector_keeps_the_t2_and_never_chooses_the_dixon_series(dixon_case):
    selection = dixon_case["selection"]
    assert selection.chosen.series_uid == dixon_case["case"].series_uid
    dixon = [d for d in selection.decisions if "dixon" in d.description]
    assert len(dixon) == 2 and not any(d.accepted for d in dixon)


def test_pdff_on_the_real_dixon_case_matches_water_and_fat_inside_the_manual_masks(dixon_case, bundle_labels):
    stack = dixon_case["stack"]
    pair, why = find_dixon_pair(dixon_case["study"], str(stack.datasets[0].FrameOfReferenceUID),
                                {dixon_case["selection"].chosen.series_uid})
    assert pair is not None, why
    assert dixon_kind(pair.water)[0] == "water" and dixon_kind(pair.fat)[0] == "fat"
    pdff = pdff_on_stack(pair, stack)
    labels, truth = dixon_case["labels"], dixon_case["pdff_truth"]
    muscle = labels > 0
    assert np.isfinite(pdff[muscle]).all()
    # Same grid (identity resampling); W and F were stored on one integer scale: agreement to 0.2 pp per voxel.
    assert np.abs(pdff[muscle] - truth[muscle]).max() < 0.002
    measures = measure_stack(stack, labels, bundle_labels.labels, "otsu", pdff=pdff)
    for m in measures:
        if not m.found:
            continue
        assert m.pdff_pct == pytest.approx(100 * float(truth[labels == m.label].mean()), abs=0.05)
        assert 5.0 < m.pdff_pct < 25.0  # healthy volunteer's paraspinal muscles
    assert {m.label for m in measures if m.found} == {1, 2, 3, 4}


def _volume(affine: np.ndarray, shape: tuple[int, int, int]) -> StackVolume:
    return StackVolume("1.2.3", 1, [], np.zeros(shape, dtype=np.float32), affine,
                       (float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0]))),
                       float(np.linalg.norm(affine[:3, 2])))


def test_dixon_resampling_follows_patient_coordinates_onto_another_grid():
    """Water/fat on a coarser, flipped, shifted grid: the PDFF ramp along patient x lands where it should."""
    t2 = np.array([[0.8, 0, 0, -60.0], [0, 0.8, 0, -40.0], [0, 0, 4.0, -10.0], [0, 0, 0, 1]])
    target = _volume(t2, (6, 100, 150))
    dixon = np.array([[-1.6, 0, 0, 70.0], [0, 1.6, 0, -50.0], [0, 0, 2.0, -16.0], [0, 0, 0, 1]])
    shape = (24, 70, 90)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    x = dixon[0, 0] * i + dixon[0, 3]  # patient x of each Dixon voxel
    pdff_of_x = np.clip((x + 60.0) / 150.0, 0.0, 1.0)  # a ramp along patient x
    water = 1000.0 * (1.0 - pdff_of_x)
    fat = 1000.0 * pdff_of_x
    from paraspinal.dixon import pdff_from_water_fat

    pdff = pdff_from_water_fat(resample_to_stack(water, dixon, target), resample_to_stack(fat, dixon, target))
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in target.pixels.shape), indexing="ij")
    expected = np.clip((t2[0, 0] * ii + t2[0, 3] + 60.0) / 150.0, 0.0, 1.0)
    inside = np.isfinite(pdff)
    assert inside.mean() > 0.9
    assert np.abs(pdff[inside] - expected[inside]).max() < 0.01


def test_every_registered_method_is_named_in_the_private_scheme():
    for key, method in FAT_METHODS.items():
        assert method.key == key and len(method.code) <= 14 and len(method.meaning) <= 50
