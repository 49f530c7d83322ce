"""Dixon PDFF in each muscle's mask eroded in-plane: what is kept, the mean/median/voxel count, and
that the SR, the CSV and the PDF say how it was measured."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import numpy as np
import pytest

from app.config import ConfigError, load_config
from dicom_validators import dciodvfy_errors, dcmqi_read_sr
from paraspinal.dicom_index import index_folder
from paraspinal.dicom_outputs import build_measurement_report, build_segmentation
from paraspinal.quantification import eroded_in_plane, measure_stack, pdff_in_mask
from paraspinal.report_pdf import ReportContext, ReportStack, render_report_pdf
from paraspinal.results_folder import measurement_rows
from paraspinal.series_selection import select_series
from paraspinal.stacks import load_stack
from paraspinal.synthetic_study import make_synthetic_study


def _square_with_fatty_rim() -> tuple[np.ndarray, np.ndarray]:
    """Two slices with a 10 x 10 muscle: PDFF 50 % on its one-voxel rim, 10 % inside; a third slice empty."""
    mask = np.zeros((3, 20, 20), dtype=bool)
    mask[:2, 5:15, 5:15] = True
    pdff = np.full(mask.shape, 0.9, dtype=np.float32)  # fat around the muscle
    pdff[mask] = 0.5
    pdff[:2, 6:14, 6:14] = 0.1
    return mask, pdff


def test_erosion_keeps_voxels_farther_than_the_depth_from_the_edge_in_plane_only():
    mask, _ = _square_with_fatty_rim()
    assert eroded_in_plane(mask, 0).sum() == mask.sum()
    one = eroded_in_plane(mask, 1)
    assert one.sum() == 2 * 8 * 8 and one[:2, 6:14, 6:14].all()  # never eroded from the slice above/below
    assert eroded_in_plane(mask, 2).sum() == 2 * 6 * 6
    edge = np.zeros((1, 5, 5), dtype=bool)
    edge[0, :, :3] = True  # touching the image border: the border counts as outside
    assert eroded_in_plane(edge, 1).sum() == 3 * 1


def test_pdff_in_an_eroded_mask_reports_mean_median_voxels_and_per_slice_values():
    mask, pdff = _square_with_fatty_rim()
    whole = pdff_in_mask(pdff, mask, 0)
    assert whole.voxels == 200 and whole.mean_pct == pytest.approx(100 * (64 * 0.1 + 36 * 0.5) / 100, abs=0.01)
    assert whole.median_pct == pytest.approx(10.0)
    eroded = pdff_in_mask(pdff, mask, 1)
    assert (eroded.mean_pct, eroded.median_pct, eroded.voxels) == (pytest.approx(10.0), pytest.approx(10.0), 128)
    assert eroded.slice_mean_pct == [pytest.approx(10.0), pytest.approx(10.0), None]
    assert eroded.slice_voxels == [64, 64, 0]
    gone = pdff_in_mask(pdff, mask, 5)  # nothing left: no value rather than a guess
    assert (gone.mean_pct, gone.median_pct, gone.voxels) == (None, None, 0)


def test_erosion_depth_is_configured_in_the_one_config_file():
    assert load_config(environ={}).quantification.pdff_erosion_voxels == 1
    assert load_config(environ={"PARASPINAL__QUANTIFICATION__PDFF_EROSION_VOXELS": "0"}
                       ).quantification.pdff_erosion_voxels == 0
    with pytest.raises(ConfigError, match="pdff_erosion_voxels"):
        load_config(environ={"PARASPINAL__QUANTIFICATION__PDFF_EROSION_VOXELS": "-1"})


@pytest.fixture(scope="module")
def eroded_report(tmp_path_factory, bundle):
    root = tmp_path_factory.mktemp("eroded")
    study = make_synthetic_study(root / "in", seed=5, rows=160, cols=160, n_slices=6, include_distractors=False)
    (record,) = index_folder(root / "in").studies.values()
    selection = select_series(record, load_config(environ={}).selection)
    (plan,) = selection.chosen.stacks
    stack = load_stack(plan, selection.chosen.series_uid, 1)
    order = {uid: k for k, uid in enumerate(study.stacks[0].sop_instance_uids)}
    index = [order[str(ds.SOPInstanceUID)] for ds in stack.datasets]
    labels, fat = study.stacks[0].labels[index], study.stacks[0].fat_mask[index]
    pdff = np.where(fat, 0.95, 0.02).astype(np.float32)
    source = {"water_series_instance_uid": "1.2.3", "fat_series_instance_uid": "1.2.4"}
    measures = measure_stack(stack, labels, bundle.labels, "signal_fraction", pdff=pdff, pdff_source=source,
                             pdff_erosion_voxels=2)
    config = load_config(environ={})
    seg = build_segmentation(stack, labels, bundle, config.output)
    sr_path = root / "sr.dcm"
    build_measurement_report([(stack, seg, measures)], bundle, config.output).save_as(sr_path,
                                                                                       enforce_file_format=True)
    return {"root": root, "stack": stack, "labels": labels, "pdff": pdff, "measures": measures, "sr": sr_path}


def test_measure_stack_measures_pdff_in_the_eroded_mask(eroded_report):
    for m in eroded_report["measures"]:
        if not m.found:
            continue
        expected = pdff_in_mask(eroded_report["pdff"], eroded_report["labels"] == m.label, 2)
        assert (m.pdff_pct, m.pdff_median_pct, m.pdff_voxels) == (expected.mean_pct, expected.median_pct,
                                                                   expected.voxels)
        assert m.pdff_erosion_voxels == 2 and 0 < m.pdff_voxels < m.n_voxels
        assert m.slice_pdff_pct == expected.slice_mean_pct


def test_sr_names_the_erosion_in_its_method_and_carries_the_median(eroded_report, tmp_path):
    assert dciodvfy_errors(eroded_report["sr"]) == []
    groups = {g["TrackingIdentifier"]: g for g in dcmqi_read_sr(eroded_report["sr"], tmp_path)["Measurements"]}
    for m in eroded_report["measures"]:
        if not m.found:
            continue
        group = groups[f"stack 1 {m.name} PDFF"]
        assert group["measurementMethod"]["CodeValue"] == "DIXONPDFFE2"
        assert "eroded in-plane 2 voxel" in group["measurementMethod"]["CodeMeaning"]
        items = {i.get("derivationModifier", {}).get("CodeMeaning", ""): float(i["value"])
                 for i in group["measurementItems"]}
        assert items == {"": pytest.approx(m.pdff_pct), "Median": pytest.approx(m.pdff_median_pct)}


def test_csv_and_pdf_state_the_erosion(eroded_report, bundle):
    found = [m for m in eroded_report["measures"] if m.found]
    rows = measurement_rows("1.2.3", [{"series_instance_uid": "1.2.4",
                                        "measurements": [dataclasses.asdict(m) for m in found]}])
    first = rows[0]
    assert (first["pdff_erosion_voxels"], first["pdff_voxels"], first["pdff_median_pct"]) == (
        2, found[0].pdff_voxels, found[0].pdff_median_pct)
    if shutil.which("pdftotext") is None:
        pytest.skip("poppler-utils (pdftotext) not installed")
    ctx = ReportContext(bundle.name, bundle.version, bundle.weights_sha256, "signal_fraction", "none", "0.1.0")
    stack = eroded_report["stack"]
    path = eroded_report["root"] / "report.pdf"
    path.write_bytes(render_report_pdf(stack.datasets[0], [ReportStack(stack, eroded_report["labels"],
                                                                       eroded_report["measures"])],
                                       bundle.labels, ctx))
    text = " ".join(subprocess.run(["pdftotext", "-layout", "-f", "1", "-l", "1", str(path), "-"],
                                   capture_output=True, text=True, check=True).stdout.split())
    assert "mean in each muscle mask eroded in-plane by 2 voxels" in text
