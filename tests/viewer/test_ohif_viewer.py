"""The node's results in a real viewer: OHIF 3.13.2 (npm ``@ohif/app`` dist) on Orthanc's DICOMweb,
in the Debian chromium driven by Playwright (``make test-viewer``).

The study is a real case (MuscleMap sample) written as an MR series and run through the real
pipeline (``python -m app run``): its SEG, its SRs and its PDF report are uploaded to Orthanc with
the MR, plus two wrong SEGs made from the node's one (shifted 12 columns; mirrored left-right)
that the SEG check must reject. Screenshots go to ``build/viewer/`` (CI artefacts); the load
times to ``build/viewer/timings.json`` (benchmark figures, not asserted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from viewer_peers import (ARTEFACTS, OHIF_DIST, OhifServer, browser_unavailable_reason, launch_chromium,
                          start_orthanc_dicomweb)
import ohif_checks as ohif

ROOT = Path(__file__).resolve().parents[2]
VIEWPORT = {"width": 1600, "height": 1000}

_reason = browser_unavailable_reason()
if _reason:
    pytest.skip(f"real-viewer test skipped: {_reason}", allow_module_level=True)


def _wrong_seg(seg: pydicom.Dataset, how: str) -> pydicom.Dataset:
    """A copy of the node's SEG with every frame shifted 12 columns to the right or mirrored
    left-right (the same source references), under new UIDs and its own series description."""
    wrong = seg.copy()
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    frames = np.roll(frames, 12, axis=-1) if how == "shifted" else frames[:, :, ::-1]
    wrong.PixelData = np.packbits(np.ascontiguousarray(frames).reshape(-1), bitorder="little").tobytes()
    wrong.SOPInstanceUID = pydicom.uid.generate_uid()
    wrong.file_meta.MediaStorageSOPInstanceUID = wrong.SOPInstanceUID
    wrong.SeriesInstanceUID = pydicom.uid.generate_uid()
    wrong.SeriesNumber = 9101 if how == "shifted" else 9102
    wrong.SeriesDescription = f"Wrong SEG {how} (negative control)"
    return wrong


def _expected_labels(seg_path: Path) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Per source SOP Instance UID, the segment numbers (rows x columns) the SEG holds; segment names."""
    seg = hd.seg.segread(seg_path)
    numbers = [int(d.SegmentNumber) for d in seg.SegmentSequence]
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    sops = sorted({str(s.ReferencedSOPInstanceUID) for f in seg.PerFrameFunctionalGroupsSequence
                   for d in f.DerivationImageSequence for s in d.SourceImageSequence})
    out = {}
    for sop in sops:
        out[sop] = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[sop], segment_numbers=numbers, combine_segments=True, relabel=False,
            skip_overlap_checks=True)[0].astype(np.int32)
    return out, names


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, real_data):
    """Orthanc + OHIF + chromium with the study loaded; yields what the tests need."""
    from test_seg_sr_outputs import write_real_case  # the real case as an MR series

    work = tmp_path_factory.mktemp("viewer")
    write_real_case(real_data, work / "in")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "app", "run", "-i", str(work / "in"), "-o", str(work / "out"),
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    pipeline_s = time.monotonic() - started
    (out,) = [p for p in (work / "out").iterdir() if p.is_dir()]
    seg_path, sr_path, viewer_sr_path, pdf_path = (out / "seg_stack1.dcm", out / "sr.dcm", out / "sr_viewer.dcm",
                                                   out / "report_pdf.dcm")
    seg = pydicom.dcmread(seg_path)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "report.pdf").write_bytes((out / "report.pdf").read_bytes())
    wrong = {how: work / f"seg_{how}.dcm" for how in ("shifted", "mirrored")}
    for how, path in wrong.items():
        _wrong_seg(seg, how).save_as(path, enforce_file_format=True)
    orthanc = start_orthanc_dicomweb(work / "orthanc")
    server = None
    try:
        for path in [*sorted((work / "in").iterdir()), seg_path, sr_path, viewer_sr_path, pdf_path, *wrong.values()]:
            orthanc.rest("POST", "/instances", path.read_bytes())
        server = OhifServer(orthanc.http_port)
        from playwright.sync_api import sync_playwright

        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        expected, names = _expected_labels(seg_path)
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                yield {"browser": browser, "url": server.url, "study": str(seg.StudyInstanceUID),
                       "seg": seg, "expected": expected, "names": names, "sr_path": sr_path,
                       "viewer_sr_path": viewer_sr_path, "pdf_path": pdf_path, "pipeline_s": pipeline_s,
                       "timings": {"pipeline_s": round(pipeline_s, 1)}}
            finally:
                browser.close()
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


@pytest.fixture
def page(viewer):
    """A fresh tab with the study open; console errors collected in ``page.errors``."""
    context = viewer["browser"].new_context(viewport=VIEWPORT, device_scale_factor=1)
    tab = context.new_page()
    tab.errors = []
    tab.on("pageerror", lambda error: tab.errors.append(str(error)))
    timings = ohif.Timings()
    ohif.open_study(tab, viewer["url"], viewer["study"], timings)
    viewer["timings"].setdefault("study_to_first_image_s", []).append(timings.values["study_to_first_image_s"])
    yield tab
    context.close()
    (ARTEFACTS / "timings.json").write_text(json.dumps(viewer["timings"], indent=2))


def _key_source(expected: dict[str, np.ndarray]) -> str:
    """The source image with the most segmented pixels (the one a reader looks at first)."""
    return max(expected, key=lambda sop: int((expected[sop] > 0).sum()))


def _seg_problems(page, viewer, description: str, shot: str) -> list[str]:
    started = time.monotonic()
    segmentation_id = ohif.load_segmentation(page, description)
    viewer["timings"].setdefault("seg_load_s", round(time.monotonic() - started, 2))
    sop = _key_source(viewer["expected"])
    ohif.show_source_image(page, sop)
    problems = []
    if ohif.displayed_sop(page) != sop:
        problems.append(f"displayed MR {ohif.displayed_sop(page)} is not the SEG's source image {sop}")
    return problems + ohif.check_segmentation(page, segmentation_id, viewer["expected"][sop], viewer["names"],
                                              ARTEFACTS / shot)


def test_seg_segments_show_with_their_names_on_the_referenced_mr_image(page, viewer):
    page.locator("[data-cy=panelSegmentation-btn]").click()  # the panel listing the segments by name
    problems = _seg_problems(page, viewer, "Paraspinal muscles SEG", "ohif_seg.png")
    assert problems == []
    panel = page.locator("body").inner_text()
    for name in viewer["names"].values():
        assert name in panel
    assert not [e for e in page.errors if "ReferencedSOPSequence" in e]


@pytest.mark.parametrize("how", ["shifted", "mirrored"])
def test_shifted_or_mirrored_seg_fails_the_seg_check(page, viewer, how):
    problems = _seg_problems(page, viewer, f"Wrong SEG {how}", f"ohif_seg_{how}.png")
    assert any("Dice" in p for p in problems), problems
    if how == "mirrored":  # left and right swap: the screen shows the other side's colour
        assert any("colour" in p for p in problems), problems


def _sr_groups(path: Path) -> dict[str, dict[str, float]]:
    """Tracking identifier -> {concept meaning: value} of the SR's groups with an image region."""
    sr = hd.sr.srread(path)
    out = {}
    for group in sr.content.get_planar_roi_measurement_groups():
        if group.roi is None:
            continue
        out[str(group.tracking_identifier)] = {m.name.meaning: float(m.value) for m in group.get_measurements()}
    return out


def _sr_outlines(path: Path) -> list[dict]:
    """Per outline group of the viewer SR: its Comment (the label OHIF shows), area (mm2) and the
    SOP Instance UID of the image it is drawn on."""
    sr = hd.sr.srread(path)
    out = []
    for group in sr.content.get_planar_roi_measurement_groups():
        items = group[0].ContentSequence if hasattr(group[0], "ContentSequence") else group.ContentSequence
        comment = next(i.TextValue for i in items if i.ValueType == "TEXT"
                       and i.ConceptNameCodeSequence[0].CodeValue == "121106")
        area = next(float(m.value) for m in group.get_measurements() if m.name.meaning == "Area")
        sop = str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        out.append({"label": comment, "area": area, "sop": sop})
    return out


def test_sr_outline_measurements_show_with_their_labels_and_values(page, viewer):
    timings = ohif.Timings()
    measurements = ohif.sr_measurements(page, "Paraspinal muscle outlines", timings)
    viewer["timings"]["viewer_sr_load_s"] = timings.values["sr_load_s"]
    viewer["timings"]["viewer_sr_bytes"] = viewer["viewer_sr_path"].stat().st_size
    viewer["timings"]["sr_bytes"] = viewer["sr_path"].stat().st_size
    expected = _sr_groups(viewer["viewer_sr_path"])
    assert expected, "the viewer SR holds no outline group"
    shown = {m["tracking"]: m for m in measurements}
    assert set(shown) == set(expected)
    for tracking, values in expected.items():
        m = shown[tracking]
        assert m["loaded"], f"{tracking}: OHIF did not place it on its MR image"
        assert m["graphicType"] == "POLYLINE"
        labels = {label["label"]: label["value"] for label in m["labels"]}
        for meaning, value in values.items():  # OHIF prints NumericValue.toFixed(2) and the UCUM code
            assert labels.get(meaning, "").startswith(f"{value:.2f} "), (tracking, meaning, labels)
    # What is on screen: the image of a measured slice with the outlines' texts drawn over it.
    on_image = [m for m in measurements if m["sop"] == ohif.displayed_sop(page)]
    assert on_image, "the SR viewport does not show a measured slice"
    # OHIF 3.13.2 tells its SR overlay tool which outlines to draw without asking for a new render
    # (setTrackingUniqueIdentifiersForElement): when the image was drawn first, the outlines appear
    # only at the reader's first scroll. Recorded, then the reader's scroll away and back.
    texts = " ".join(ohif.wait_for_viewport_texts(page))
    viewer["timings"].setdefault("sr_outlines_drawn_before_first_scroll", []).append(bool(texts))
    if not texts:
        ohif.scroll_away_and_back(page)
        texts = " ".join(ohif.viewport_texts(page))
    for m in on_image:
        area = next(label for label in m["labels"] if label["label"] == "Area")
        assert f"Area: {area['value']}" in texts
    assert "Something went wrong" not in page.content()
    assert not page.errors


def test_tracked_sr_outlines_fill_the_measurements_panel_with_their_labels_and_areas(page, viewer):
    """A reader accepts OHIF's offer to track the outlines SR: every outline becomes one of OHIF's
    own measurements, listed in the measurements panel by its label (muscle, side, level or slice,
    fat fraction, PDFF, review flag) with the area OHIF measures on the outline it draws, on the
    image the SR names."""
    timings = ohif.Timings()
    ohif.sr_measurements(page, "Paraspinal muscle outlines", timings)
    tracked = ohif.track_sr_measurements(page, timings)
    viewer["timings"]["viewer_sr_track_s"] = timings.values["sr_track_s"]
    expected = _sr_outlines(viewer["viewer_sr_path"])
    assert sorted(m["label"] or "" for m in tracked) == sorted(e["label"] for e in expected)
    for e in expected:
        (m,) = [m for m in tracked if m["label"] == e["label"]]
        assert m["toolName"] == "PlanarFreehandROI"
        assert m["sop"] == e["sop"], f"{e['label']}: tracked on another image"
        # OHIF measures the polygon it draws; the SR's area counts the mask's pixels. They agree
        # when the outline lies where the muscle is (the simplified contour: within a few %).
        assert m["area"] == pytest.approx(e["area"], rel=0.05), (e["label"], m["area"], e["area"])
    page.locator("[data-cy=trackedMeasurements-btn]").click()
    page.wait_for_timeout(2_000)
    panel = page.locator("body").inner_text()
    assert f"Measurements ({len(expected)})" in panel
    for e in expected:
        assert e["label"] in panel
    page.screenshot(path=str(ARTEFACTS / "ohif_sr.png"))
    assert "Something went wrong" not in page.content()
    assert not page.errors


def test_complete_sr_opens_without_breaking_the_viewer_when_outlines_come_last(page, viewer):
    """The complete SR (volumetric and per-slice groups for Slicer, outlines last) is listed and its
    outline groups are found by OHIF; OHIF 3.13.2 cannot show its other groups."""
    timings = ohif.Timings()
    measurements = ohif.sr_measurements(page, "Paraspinal muscle measurements", timings)
    viewer["timings"]["complete_sr_load_s"] = timings.values["sr_load_s"]
    outlines = _sr_groups(viewer["sr_path"])
    placed = {m["tracking"] for m in measurements if m["loaded"]}
    assert set(outlines) <= placed


def test_pdf_report_opens_in_the_viewer(page, viewer):
    started = time.monotonic()
    ohif.open_series(page, "Paraspinal muscle report PDF")
    page.wait_for_function("() => { const o = document.querySelector('object[type=\"application/pdf\"]');"
                           " return o && o.data && o.data.startsWith('blob:'); }", timeout=60_000)
    viewer["timings"]["pdf_open_s"] = round(time.monotonic() - started, 2)
    head, size = page.evaluate("""async () => {
      const o = document.querySelector('object[type="application/pdf"]');
      const bytes = new Uint8Array(await (await fetch(o.data)).arrayBuffer());
      return [String.fromCharCode(...bytes.slice(0, 5)), bytes.length]; }""")
    document = pydicom.dcmread(viewer["pdf_path"]).EncapsulatedDocument
    assert head == "%PDF-"
    assert size in (len(document), len(document.rstrip(b"\x00")))  # the whole report (with or without the pad byte)
    page.wait_for_timeout(3_000)
    page.screenshot(path=str(ARTEFACTS / "ohif_pdf.png"))
