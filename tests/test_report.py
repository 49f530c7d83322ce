"""The report for people: PDF pages that render and say what they must, the Encapsulated PDF in
the study (dciodvfy), and report.pdf + report_pdf.dcm in the results folder."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from app.config import RESEARCH_USE_STATEMENT, load_config
from dicom_validators import dciodvfy_errors
from paraspinal.dicom_index import index_folder
from paraspinal.dicom_outputs import stable_uid
from paraspinal.quantification import measure_stack
from paraspinal.report_pdf import (ENCAPSULATED_PDF_STORAGE, NOT_EVALUATED, PdfFile, ReportContext, ReportStack,
                                   _count_pages, encapsulated_pdf, radiological_view, render_report_pdf,
                                   slice_bands)
from paraspinal.results_folder import write_results_folder
from paraspinal.series_selection import select_series
from paraspinal.stacks import StackVolume, load_stack
from paraspinal.synthetic_study import make_synthetic_study
from test_measurements import stand_in_bundle

pytestmark = pytest.mark.skipif(shutil.which("pdftoppm") is None or shutil.which("pdftotext") is None,
                                reason="poppler-utils (pdftoppm, pdftotext) not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    bundle = stand_in_bundle()
    study = make_synthetic_study(root / "in", seed=9, rows=160, cols=160, n_slices=10, slice_spacing=4.0,
                                 include_distractors=False)
    (record,) = index_folder(root / "in").studies.values()
    selection = select_series(record, load_config(environ={}).selection)
    (plan,) = selection.chosen.stacks
    stack = load_stack(plan, selection.chosen.series_uid, 1)
    order = {uid: k for k, uid in enumerate(study.stacks[0].sop_instance_uids)}
    index = [order[str(ds.SOPInstanceUID)] for ds in stack.datasets]
    labels = study.stacks[0].labels[index]
    pdff = np.where(study.stacks[0].fat_mask[index], 0.95, 0.02).astype(np.float32)
    measures = measure_stack(stack, labels, bundle.labels, "signal_fraction", pdff=pdff,
                             pdff_source={"water_series_description": "dixon_W", "fat_series_description": "dixon_F"})
    ctx = ReportContext(bundle.name, bundle.version, bundle.weights_sha256, "signal_fraction", "none", "0.1.0")
    stacks = [ReportStack(stack, labels, measures)]
    pdf = render_report_pdf(stack.datasets[0], stacks, bundle.labels, ctx)
    path = root / "report.pdf"
    path.write_bytes(pdf)
    return {"root": root, "pdf": pdf, "path": path, "stack": stack, "stacks": stacks, "measures": measures,
            "bundle": bundle}


def _page_text(path, page: int) -> str:
    return subprocess.run(["pdftotext", "-layout", "-f", str(page), "-l", str(page), str(path), "-"],
                          capture_output=True, text=True, check=True).stdout


def test_pdf_pages_render_and_each_carries_the_research_use_statement(report, tmp_path):
    subprocess.run(["pdftoppm", "-png", "-r", "30", str(report["path"]), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) == _count_pages(report["stacks"]) >= 3  # summary, key images, per-slice table
    assert all(p.stat().st_size > 2000 for p in pages)
    for number in range(1, len(pages) + 1):
        text = " ".join(_page_text(report["path"], number).split())
        assert RESEARCH_USE_STATEMENT.split(".")[0] in text, f"page {number}"


def test_summary_page_names_method_model_levels_and_every_muscle(report):
    text = " ".join(_page_text(report["path"], 1).split())
    assert "Fat-signal fraction, lean to subcutaneous fat" in text
    assert f"{report['bundle'].name} {report['bundle'].version}" in text
    assert "level unknown" in text and "slice position" in text
    assert "dixon_W" in text
    for m in report["measures"]:
        assert m.muscle in text
        assert f"{m.fat_fraction_pct:.1f}" in text and f"{m.volume_cm3:.1f}" in text


def test_key_images_and_slice_table_pages_say_where_each_slice_is(report):
    text = " ".join(_page_text(report["path"], 2).split())
    assert "band 1" in text and "lumbar level not determined" in text
    last = " ".join(_page_text(report["path"], _count_pages(report["stacks"])).split())
    m = report["measures"][0]
    k = m.present_slices[0]
    assert f"{m.slice_z_mm[k]:+.1f}" in last and f"{m.slice_csa_mm2[k]:.0f} / {m.slice_fat_fraction_pct[k]:.1f}" in last


def test_encapsulated_pdf_passes_dciodvfy_and_holds_the_pdf_in_the_study(report, tmp_path):
    source = report["stack"].datasets[0]
    ds = encapsulated_pdf(report["pdf"], source, series_instance_uid=stable_uid("s", "pdf-series"),
                          sop_instance_uid=stable_uid("s", "pdf-instance"), series_number=9003,
                          manufacturer="Paraspinal Muscle Node project", model_name="paraspinal-node",
                          software_version="0.1.0")
    path = tmp_path / "report_pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE and back.Modality == "DOC"
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert bytes(back.EncapsulatedDocument)[:back.EncapsulatedDocumentLength] == report["pdf"]
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"


def test_results_folder_holds_report_pdf_beside_the_encapsulated_pdf(report, tmp_path):
    source = report["stack"].datasets[0]
    ds = encapsulated_pdf(report["pdf"], source, series_instance_uid=stable_uid("s", "pdf-series"),
                          sop_instance_uid=stable_uid("s", "pdf-instance"), series_number=9003,
                          manufacturer="m", model_name="n", software_version="v")
    study_uid = str(source.StudyInstanceUID)
    folder = write_results_folder(tmp_path, study_uid, {"status": "done"},
                                  {"report_pdf.dcm": ds, "report.pdf": PdfFile(report["pdf"])}, None)
    assert (folder / "report.pdf").read_bytes() == report["pdf"]
    assert pydicom.dcmread(folder / "report_pdf.dcm").SOPClassUID == ENCAPSULATED_PDF_STORAGE


def _stack(affine: np.ndarray) -> StackVolume:
    return StackVolume("1.2.3", 1, [], np.zeros((1, 4, 6), np.float32), affine, (1.0, 1.0), 1.0)


@pytest.mark.parametrize("row_x, col_y, transpose", [(1, 1, False), (-1, 1, False), (1, -1, False), (-1, -1, False),
                                                     (1, 1, True)])
def test_radiological_view_puts_the_patients_right_on_the_left_and_anterior_up(row_x, col_y, transpose):
    affine = np.eye(4)
    if transpose:  # columns run posteriorly, rows to the patient's left
        affine[:3, 0], affine[:3, 1] = (0, 1, 0), (1, 0, 0)
        image = np.zeros((6, 4))
        image[:, 0] = np.arange(6)  # x grows with the row index; column 0 is the most anterior
    else:
        affine[:3, 0], affine[:3, 1] = (row_x, 0, 0), (0, col_y, 0)
        image = np.zeros((4, 6))
        image[:] = np.arange(6) * row_x  # intensity grows with patient x (towards the left)
        image += 100 * np.arange(4)[:, None] * col_y  # and with patient y (posterior)
    view, _ = radiological_view(_stack(affine), image)
    if transpose:
        assert np.all(np.diff(view[0]) >= 0)  # left to right on screen: towards the patient's left
    else:
        assert np.all(np.diff(view, axis=1) > 0)  # screen right = patient left
        assert np.all(np.diff(view, axis=0) > 0)  # screen down = posterior


def test_slice_bands_cover_the_muscle_slices_in_about_30_mm_bands():
    z = [4.0 * k for k in range(29)]
    bands = slice_bands(z, list(range(29)))
    assert len(bands) == math.ceil(112 / 30) and sorted(k for b in bands for k in b) == list(range(29))
    assert slice_bands(z[:5], [0, 1, 2, 3, 4]) == [[0, 1, 2, 3, 4]]
    assert slice_bands(z, []) == []


def _word_boxes(path, page: int) -> list[tuple[str, float, float]]:
    """(word, yMin, yMax) of every word on a page, in PDF points from the top (pdftotext -bbox)."""
    html = subprocess.run(["pdftotext", "-bbox", "-f", str(page), "-l", str(page), str(path), "-"],
                          capture_output=True, text=True, check=True).stdout
    return [(w, float(y0), float(y1)) for y0, y1, w in
            re.findall(r'<word xMin="[^"]+" yMin="([^"]+)" xMax="[^"]+" yMax="([^"]+)">([^<]*)</word>', html)]


def test_summary_page_notes_stay_between_the_chart_and_the_research_use_footer(report, tmp_path):
    """Extra notes (e.g. a Dixon or level caveat) push the chart up; they never run into the
    research-use footer, and the chart's axis labels never run into the notes."""
    extra = ["Caveat " + "word " * 60 + "ZZENDNOTE"] * 3
    ctx = ReportContext(report["bundle"].name, report["bundle"].version, report["bundle"].weights_sha256,
                        "signal_fraction", "none", "0.1.0", notes=extra)
    path = tmp_path / "report.pdf"
    path.write_bytes(render_report_pdf(report["stack"].datasets[0], report["stacks"], report["bundle"].labels, ctx))
    words = _word_boxes(path, 1)
    footer_top = max(y0 for w, y0, _ in words if w == "RESEARCH")  # the footer is the lowest "RESEARCH"
    notes_bottom = max(y1 for w, _, y1 in words if w == "ZZENDNOTE")
    notes_top = max(y0 for w, y0, _ in words if w == "Goutallier")  # the notes' mention lies below the table's
    chart_axis_bottom = max(y1 for w, _, y1 in words if w == "lumborum")  # the chart's last tick label
    assert notes_bottom <= footer_top
    assert chart_axis_bottom <= notes_top


def test_summary_table_gives_each_muscles_held_out_dice_or_says_not_evaluated(report, tmp_path):
    """A reader sees, beside each muscle's numbers, how well the model segments that muscle on
    held-out real data, and which muscles have no such figure (psoas and quadratus lumborum for
    the shipped bundle, whose held-out case labels multifidus and erector spinae only)."""
    import hashlib

    from paraspinal.model_bundle import held_out_dice, read_metadata

    bundle_dir = Path(__file__).resolve().parents[1] / "models" / "paraspinal_t2ax"
    metadata = read_metadata(bundle_dir)
    weights = hashlib.sha256((bundle_dir / metadata["weights"]["file"]).read_bytes()).hexdigest()
    dice = held_out_dice(metadata, weights)
    assert set(dice) == {1, 2, 3, 4} and all(0.0 < d < 1.0 for d in dice.values())
    assert held_out_dice(metadata, "0" * 64) == {}  # figures of other weights never shown

    ctx = ReportContext(report["bundle"].name, report["bundle"].version, report["bundle"].weights_sha256,
                        "signal_fraction", "none", "0.1.0", held_out_dice=dice)
    path = tmp_path / "report.pdf"
    path.write_bytes(render_report_pdf(report["stack"].datasets[0], report["stacks"], report["bundle"].labels, ctx))
    text = " ".join(_page_text(path, 1).split())
    assert "model Dice" in text and "held-out" in text
    assert f"{dice[1]:.2f}" in text and f"{dice[3]:.2f}" in text
    found = {m.label for m in report["measures"] if m.found}
    assert text.count(NOT_EVALUATED) >= len(found - set(dice)) >= 1


def test_a_flagged_muscle_is_named_with_its_reasons_in_the_pdf_csv_and_result_json(report, tmp_path):
    """Quality control in the outputs people read: an uncertain erector spinae right (per-slice mirror
    disagreement 0.5) gets REVIEW in the PDF table, its reason under it and a key image of its most
    uncertain slice; measurements.csv and result.json name it; the other muscles stay unflagged."""
    import csv
    import json

    from paraspinal.results_folder import measurement_rows, review_summary
    from paraspinal.segmentation import SliceUncertainty

    stack = report["stack"]
    labels = report["stacks"][0].labels
    n = stack.n_slices
    disagreement = {info.value: [0.02] * n for info in report["bundle"].labels}
    disagreement[3] = [0.5] * n
    uncertainty = SliceUncertainty(disagreement, {v: [0.1] * n for v in disagreement})
    measures = measure_stack(stack, labels, report["bundle"].labels, "signal_fraction", uncertainty=uncertainty)
    flagged = {m.name for m in measures if m.quality.review_recommended}
    assert flagged == {"erector spinae right"}, flagged
    bundle = report["bundle"]
    ctx = ReportContext(bundle.name, bundle.version, bundle.weights_sha256, "signal_fraction", "none", "0.1.0")
    stacks = [ReportStack(stack, labels, measures)]
    path = tmp_path / "qc.pdf"
    path.write_bytes(render_report_pdf(stack.datasets[0], stacks, bundle.labels, ctx))
    page1 = " ".join(_page_text(path, 1).split())
    assert "REVIEW (0.50)" in page1 and "Review recommended (quality control):" in page1
    assert "erector spinae right: uncertain outline (mirror disagreement 0.50 > 0.15)" in page1
    pages = " ".join(" ".join(_page_text(path, p).split()) for p in range(2, _count_pages(stacks) + 1))
    assert "review erector spinae R, its most uncertain slice" in pages
    stacks_json = [{"series_instance_uid": stack.series_uid, "measurements": [m.as_dict() for m in measures]}]
    rows = {(r["muscle"], r["side"]): r for r in measurement_rows("1.2.3", stacks_json) if not r["level"]}
    assert rows[("erector spinae", "right")]["review_recommended"] == "yes"
    assert "uncertain outline" in rows[("erector spinae", "right")]["review_reasons"]
    assert rows[("multifidus", "left")]["review_recommended"] == "no"
    assert [(e["muscle"], e["side"]) for e in review_summary(stacks_json)] == [("erector spinae", "right")]
    json.dumps(stacks_json)  # the quality record serialises as measurements.json carries it
    assert list(csv.reader([",".join(rows[("erector spinae", "right")].keys())]))[0][-3:] == [
        "review_recommended", "review_reasons", "outline_uncertainty"]
