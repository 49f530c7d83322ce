"""What a radiologist sees in OHIF, read from OHIF's own state (window.services, cornerstone) and
from screenshots. Each check returns a list of problems (empty: as expected), so a test can show
that a wrong object (a shifted or mirrored SEG) is caught.

Coordinates: SEG and SR pixel arrays are (row, column) of the source image; cornerstone's
``imageToWorldCoords`` takes (column, row) with pixel centres at integers.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

OPEN_TIMEOUT_MS = 120_000


@dataclass
class Timings:
    """Seconds from navigation to each milestone, measured in the page's session (benchmark figures)."""

    values: dict[str, float] = field(default_factory=dict)


def open_study(page, base_url: str, study_uid: str, timings: Timings | None = None) -> None:
    """Open the study in OHIF's default (longitudinal) mode and wait for the first image on screen."""
    start = time.monotonic()
    page.goto(f"{base_url}/viewer?StudyInstanceUIDs={study_uid}")
    page.wait_for_function(
        "() => { const cs = window.cornerstone; if (!cs || !window.services) return false;"
        " const e = cs.getRenderingEngines()[0]; if (!e) return false;"
        " const v = e.getViewports()[0]; return !!(v && v.getCurrentImageId && v.getCurrentImageId()"
        " && cs.cache.getImage(v.getCurrentImageId())); }", timeout=OPEN_TIMEOUT_MS)
    if timings is not None:
        timings.values["study_to_first_image_s"] = round(time.monotonic() - start, 2)
    skip = page.get_by_text("Skip all")  # the first-visit tour
    try:
        skip.click(timeout=5_000)
    except Exception:  # noqa: BLE001 (no tour shown: nothing to skip)
        pass


def open_series(page, description: str) -> None:
    """Double-click a series thumbnail in the study browser, as a reader does."""
    page.get_by_text(description, exact=False).first.dblclick()


def _viewport_state_js() -> str:
    return """
      const cs = window.cornerstone;
      const vp = cs.getRenderingEngines()[0].getViewports()[0];
      const imageId = vp.getCurrentImageId();
      const sop = cs.metaData.get('instance', imageId).SOPInstanceUID;
    """


def show_source_image(page, sop_instance_uid: str) -> None:
    """Scroll the first viewport to the image of that SOP Instance UID (asked again until shown:
    OHIF may rebuild the viewport while a SEG or SR is being loaded)."""
    try:
        page.wait_for_function("""(target) => {
          const cs = window.cornerstone;
          const vp = cs.getRenderingEngines()[0].getViewports()[0];
          const ids = vp.getImageIds();
          const i = ids.findIndex(id => id.includes('/instances/' + target + '/'));
          if (i < 0) return false;
          if (vp.getCurrentImageId() !== ids[i]) { vp.setImageIdIndex(i); return false; }
          return cs.metaData.get('instance', ids[i]).SOPInstanceUID === target; }""",
                               arg=sop_instance_uid, polling=500, timeout=60_000)
    except Exception as exc:  # noqa: BLE001 (say what was not shown)
        raise AssertionError(f"OHIF did not show the image of SOP Instance {sop_instance_uid}: {exc}") from exc
    page.wait_for_timeout(1_500)  # let the overlay render


def load_segmentation(page, description: str) -> str:
    """Open a SEG series and accept OHIF's "open this segmentation?" prompt; returns OHIF's
    segmentation id once its labelmap exists."""
    open_series(page, description)
    page.get_by_role("button", name="Yes").click(timeout=60_000)
    return page.wait_for_function("""(label) => {
      const segs = window.cornerstoneTools.segmentation.state.getSegmentations();
      const s = segs.find(s => (s.label || "").startsWith(label));
      return s && s.representationData.Labelmap && s.representationData.Labelmap.imageIds ? s.segmentationId : null;
    }""", arg=description, timeout=60_000).json_value()


def ohif_segmentation_on_screen(page, segmentation_id: str) -> dict:
    """OHIF's state for the displayed image: its SOP Instance UID, the segment labels and colours,
    the labelmap OHIF built for that image (segment numbers, rows x columns), and the canvas
    position (CSS px, relative to the page) of given image points."""
    return page.evaluate("""(segId) => {""" + _viewport_state_js() + """
      const ct = window.cornerstoneTools;
      const seg = ct.segmentation.state.getSegmentation(segId);
      const lm = seg.representationData.Labelmap;
      const lmId = lm.imageIds.find(id => cs.cache.getImage(id) && cs.cache.getImage(id).referencedImageId === imageId);
      const lmImage = lmId ? cs.cache.getImage(lmId) : null;
      const segments = {};
      for (const [index, s] of Object.entries(seg.segments)) {
        if (!s) continue;
        const colour = window.services.segmentationService.getSegmentColor(vp.id, segId, Number(index));
        segments[index] = {label: s.label, colour: colour ? Array.from(colour) : null};
      }
      const rect = vp.canvas.getBoundingClientRect();
      return {sop, imageId, segments,
              labelmap: lmImage ? Array.from(lmImage.getPixelData()) : null,
              rows: lmImage ? lmImage.rows : 0, columns: lmImage ? lmImage.columns : 0,
              canvas: [rect.left, rect.top, rect.width, rect.height]};
    }""", segmentation_id)


def canvas_points(page, image_points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Page CSS pixel positions of (column, row) points of the displayed image."""
    return page.evaluate("""(points) => {""" + _viewport_state_js() + """
      const rect = vp.canvas.getBoundingClientRect();
      return points.map(([c, r]) => {
        const world = cs.utilities.imageToWorldCoords(imageId, [c, r]);
        const [x, y] = vp.worldToCanvas(world);
        return [rect.left + x, rect.top + y];
      });
    }""", [list(p) for p in image_points])


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(row, column) of the pixel deepest inside a 2D mask."""
    depth = ndimage.distance_transform_edt(mask)
    r, c = np.unravel_index(int(np.argmax(depth)), mask.shape)
    return int(r), int(c)


def _chroma(rgb) -> np.ndarray:
    v = np.asarray(rgb[:3], dtype=float)
    return v - v.mean()


def check_segmentation(page, segmentation_id: str, expected: np.ndarray, names: dict[int, str],
                       screenshot_path=None) -> list[str]:
    """Problems with the SEG as OHIF shows it on the displayed image, against ``expected``
    (segment numbers, rows x columns, of that source image from the written SEG) and ``names``
    (segment number -> label):

    * a segment label differs or is missing;
    * OHIF's labelmap for this image differs from the expected one (Dice < 0.95 per segment);
    * on the screenshot, the pixel deepest inside each segment is not tinted with that segment's
      colour (nearest of the segments' colours by chroma).
    """
    problems = []
    state = ohif_segmentation_on_screen(page, segmentation_id)
    labels = {int(k): v["label"] for k, v in state["segments"].items()}
    for number, name in names.items():
        if labels.get(number) != name:
            problems.append(f"segment {number}: OHIF label {labels.get(number)!r}, expected {name!r}")
    if state["labelmap"] is None:
        return problems + [f"OHIF has no labelmap for the displayed image {state['sop']}"]
    shown = np.asarray(state["labelmap"]).reshape(state["rows"], state["columns"])
    if shown.shape != expected.shape:
        return problems + [f"labelmap {shown.shape} vs source image {expected.shape}"]
    present = [n for n in names if (expected == n).sum() >= 30]
    for number in present:
        a, b = shown == number, expected == number
        dice = 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())
        if dice < 0.95:
            problems.append(f"segment {number} {names[number]}: Dice {dice:.3f} between OHIF's overlay and the SEG")
    png = page.screenshot(path=str(screenshot_path) if screenshot_path else None)
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    colours = {n: state["segments"].get(str(n), {}).get("colour") for n in present}
    points = [interior_point(expected == n) for n in present]
    for number, (x, y) in zip(present, canvas_points(page, [(c, r) for r, c in points])):
        pixel = shot[int(round(y)), int(round(x))]
        chroma = _chroma(pixel)
        if np.linalg.norm(chroma) < 10:
            problems.append(f"segment {number} {names[number]}: no overlay colour on screen at its centre ({pixel})")
            continue
        scores = {n: float(np.dot(chroma, _chroma(c)) / (np.linalg.norm(chroma) * np.linalg.norm(_chroma(c)) + 1e-9))
                  for n, c in colours.items() if c}
        nearest = max(scores, key=scores.get)
        if nearest != number:
            problems.append(f"segment {number} {names[number]}: screen shows the colour of {names[nearest]} at its centre")
    return problems


def sr_measurements(page, description: str, timings: Timings | None = None) -> list[dict]:
    """Open an SR series; OHIF's parsed measurements of it once matched to their images
    (TrackingIdentifier, labels [{label, value}], referenced SOP, loaded). ``timings`` gets
    ``sr_load_s``: from the double-click to OHIF holding the parsed measurements."""
    start = time.monotonic()
    open_series(page, description)
    page.wait_for_function("""(desc) => {
      const ds = window.services.displaySetService.getActiveDisplaySets().find(d => (d.SeriesDescription || "").startsWith(desc));
      return ds && ds.isLoaded && ds.measurements && ds.measurements.length > 0; }""", arg=description,
                           timeout=OPEN_TIMEOUT_MS)
    if timings is not None:
        timings.values["sr_load_s"] = round(time.monotonic() - start, 2)
    page.wait_for_timeout(3_000)  # let the viewport draw them
    return page.evaluate("""(desc) => {
      const ds = window.services.displaySetService.getActiveDisplaySets().find(d => (d.SeriesDescription || "").startsWith(desc));
      return ds.measurements.map(m => ({tracking: m.TrackingIdentifier, labels: m.labels, loaded: !!m.loaded,
        sop: m.ReferencedSOPInstanceUID || null, graphicType: m.graphicType || null}));
    }""", description)


def viewport_texts(page) -> list[str]:
    """The annotation texts drawn over the viewport (SVG layer), as on screen."""
    return page.evaluate("() => Array.from(document.querySelectorAll('svg text'))"
                         ".map(t => (t.textContent || '').trim()).filter(t => t)")


def wait_for_viewport_texts(page, timeout_ms: int = 10_000) -> list[str]:
    """The viewport's annotation texts once some are drawn; [] when none come within ``timeout_ms``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:
        page.wait_for_function("() => Array.from(document.querySelectorAll('svg text'))"
                               ".some(t => (t.textContent || '').trim())", timeout=timeout_ms)
    except PlaywrightTimeoutError:  # nothing drawn: the caller says what that means
        return []
    return viewport_texts(page)


def scroll_away_and_back(page) -> None:
    """Turn the mouse wheel over the first viewport one image on and one back, as a reader does;
    the viewport then renders the same image again, with its annotations."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    index_js = "() => window.cornerstone.getRenderingEngines()[0].getViewports()[0].getCurrentImageIdIndex()"
    centre = page.evaluate("""() => { const r = window.cornerstone.getRenderingEngines()[0].getViewports()[0]
      .element.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }""")
    start = page.evaluate(index_js)
    page.mouse.move(*centre)
    for step in (120, -120):  # the last image cannot scroll on: go the other way and back
        page.mouse.wheel(0, step)
        try:
            page.wait_for_function(f"(i) => ({index_js})() !== i", arg=start, timeout=5_000)
        except PlaywrightTimeoutError:  # at the end of the stack
            continue
        page.mouse.wheel(0, -step)
        page.wait_for_function(f"(i) => ({index_js})() === i", arg=start, timeout=5_000)
        page.wait_for_timeout(1_000)
        return
    raise AssertionError("the mouse wheel did not scroll the viewport")


def displayed_sop(page) -> str:
    return page.evaluate("() => {" + _viewport_state_js() + " return sop; }")


def track_sr_measurements(page, timings: Timings | None = None) -> list[dict]:
    """Accept the SR viewport's offer to track its measurements (OHIF's "Yes", as a reader does);
    OHIF's tracked measurements then (measurementService): label, tool, referenced SOP, OHIF's own
    area of the drawn outline (mm2) and the panel's display lines. ``timings`` gets
    ``sr_track_s``: from the click to OHIF holding them."""
    page.locator("[data-cy=yes-hydrate-btn]").click(timeout=60_000)
    start = time.monotonic()
    page.wait_for_function("() => window.services.measurementService.getMeasurements().length > 0",
                           timeout=OPEN_TIMEOUT_MS)
    if timings is not None:
        timings.values["sr_track_s"] = round(time.monotonic() - start, 2)
    page.wait_for_timeout(2_000)
    return page.evaluate("""() => window.services.measurementService.getMeasurements().map(m => {
      const stats = Object.values(m.data || {})[0] || {};
      return {label: m.label || null, toolName: m.toolName, sop: m.SOPInstanceUID,
              area: (typeof stats.area === 'number') ? stats.area : null,
              primary: (m.displayText && m.displayText.primary) || []}; })""")
