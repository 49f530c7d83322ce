"""The report for people: a PDF (matplotlib) and the same PDF as a DICOM Encapsulated PDF.

Many PACS viewers cannot show DICOM SEG or TID 1500 SR; a PDF in the same study is what a
radiologist falls back on. The report holds, in this order:

1. a summary page: study and series, model and version, fat method (and N4), Dixon PDFF source,
   how slices are located (lumbar level or slice position), the research-use statement, a
   table of the stack measures per muscle and side, and a bar chart of fat fraction per muscle
   and side (Dixon PDFF beside it when measured, Goutallier boundaries drawn);
2. where lumbar levels were determined (:mod:`paraspinal.levels`), a per-level table: per level
   (head to feet) the mean CSA (mm²) and fat fraction (%) of every muscle over the slices at
   that level;
3. key images: one per lumbar level where levels were determined; the stack's other slices with
   muscle (all of them without levels) are split into bands of about 30 mm along z; the slice
   with the largest total muscle area of each level or band is shown with the segmentation as
   coloured overlays (bundle colours), a legend and orientation letters, in radiological
   display (patient's right on the image's left, anterior up);
4. per-slice tables: CSA (mm²) and fat fraction (%) of every muscle on every slice, by slice
   position and level ("unknown" where not determined).

Every page carries the research-use statement in its footer.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import textwrap
from dataclasses import dataclass, field
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID  # noqa: E402

from paraspinal.settings import RESEARCH_USE_STATEMENT  # noqa: E402
from paraspinal.fat_methods import body_mask, fat_method  # noqa: E402
from paraspinal.key_slices import key_slices, slice_bands  # noqa: E402,F401 (slice_bands re-exported)
from paraspinal.levels import level_sort_key  # noqa: E402
from paraspinal.model_bundle import LabelInfo  # noqa: E402
from paraspinal.quantification import MuscleMeasurement  # noqa: E402
from paraspinal.stacks import StackVolume  # noqa: E402

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
A4_PORTRAIT = (8.27, 11.69)
A4_LANDSCAPE = (11.69, 8.27)
SLICE_ROWS_PER_PAGE = 34
SHORT_SIDE = {"right": "R", "left": "L"}


@dataclass
class ReportStack:
    """One analysed stack: the volume, its labels and its measures."""

    volume: StackVolume
    labels: np.ndarray
    measurements: list[MuscleMeasurement]


@dataclass
class ReportContext:
    """What the report says about where the numbers come from."""

    model_name: str
    model_version: str
    weights_sha256: str
    fat_method: str
    bias_correction: str = "none"
    software_version: str = ""
    notes: list[str] = field(default_factory=list)
    #: per label, the model's Dice on held-out real data (model card); absent: never evaluated
    held_out_dice: dict[int, float] = field(default_factory=dict)


def _text(ds: Dataset, keyword: str, default: str = "-") -> str:
    value = str(ds.get(keyword, "") or "").strip()
    return value or default


def _date(value: str) -> str:
    try:
        return _dt.datetime.strptime(value, "%Y%m%d").strftime("%Y-%m-%d")
    except (TypeError, ValueError):
        return value or "-"


def _short(m: MuscleMeasurement) -> str:
    return f"{m.muscle} {SHORT_SIDE.get(m.side, m.side)}"


def method_description(key: str, bias_correction: str) -> str:
    text = fat_method(key).meaning
    return text + (" (after N4 bias-field correction)" if bias_correction == "n4" else "")


def _fmt(value, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{unit}"


# --- display geometry ------------------------------------------------------------------------

def radiological_view(stack: StackVolume, image: np.ndarray) -> tuple[np.ndarray, callable]:
    """Reorient a (row, col) slice for radiological display; returns the view and the same
    transform for other arrays (labels). Screen right = patient left (+x), screen down =
    posterior (+y), as viewed from the feet."""
    row_dir = stack.affine_lps[:3, 0] / np.linalg.norm(stack.affine_lps[:3, 0])  # along columns
    col_dir = stack.affine_lps[:3, 1] / np.linalg.norm(stack.affine_lps[:3, 1])  # along rows
    transpose = abs(row_dir[1]) > abs(row_dir[0])  # columns run antero-posterior: swap axes
    if transpose:
        horizontal, vertical = col_dir, row_dir
    else:
        horizontal, vertical = row_dir, col_dir
    flip_h = horizontal[0] < 0
    flip_v = vertical[1] < 0

    def apply(array: np.ndarray) -> np.ndarray:
        out = array.T if transpose else array
        if flip_h:
            out = out[:, ::-1]
        if flip_v:
            out = out[::-1, :]
        return out

    return apply(image), apply


def _crop_to_body(view: np.ndarray, labels: np.ndarray, margin: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """Crop a displayed slice to the body (and every labelled pixel) plus a margin: the anatomy
    fills the panel instead of the air around it."""
    keep = body_mask(view) | (labels > 0)
    if not keep.any():
        return view, labels
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    pad_r, pad_c = int(margin * view.shape[0]) + 1, int(margin * view.shape[1]) + 1
    r0, r1 = max(0, rows[0] - pad_r), min(view.shape[0], rows[-1] + pad_r + 1)
    c0, c1 = max(0, cols[0] - pad_c), min(view.shape[1], cols[-1] + pad_c + 1)
    return view[r0:r1, c0:c1], labels[r0:r1, c0:c1]


# --- pages -----------------------------------------------------------------------------------

def _page1_notes(stacks, ctx) -> str:
    """The explanatory notes under page 1's chart, wrapped to the page width."""
    notes = ["Fat fraction: share of the muscle that is fat on the T2 (threshold methods: fat voxels / all voxels; "
             "signal fraction: each voxel's intensity between lean muscle and subcutaneous fat of the same slice). "
             f"Dixon PDFF, where shown, is F/(W+F) inside the same muscle ({pdff_erosion_text(stacks)}). Grades: simplified Goutallier "
             "(< 10 % normal/mild, 10-50 % moderate, > 50 % severe). Asymmetry index: |R - L| / mean(R, L) of "
             "the two sides' volumes. Model Dice: the segmentation model's agreement with manual masks on held-out "
             f"real data (model card); '{NOT_EVALUATED}': no real-data accuracy figure exists for that muscle, so its "
             "outline and numbers need particular care. QC: REVIEW when the outline is uncertain (the number, 0-1: "
             "disagreement between the model's prediction on the slice and on its mirror image) or implausible "
             "(left-right asymmetry, area outside an adult range, pieces, gaps, one side only); key images of the "
             "most uncertain slices follow the level images. 'ok' means no check fired, not that the outline was "
             "verified: a boundary the model draws confidently but differently from the reader (e.g. where the "
             "multifidus ends) raises no flag."] + list(ctx.notes)
    return "\n".join(line for note in notes for line in textwrap.wrap(note, 125))


def _footer(fig, page: int, total: int, generated: str) -> None:
    width = 130 if fig.get_figwidth() < fig.get_figheight() else 190
    fig.text(0.5, 0.02, "\n".join(textwrap.wrap(RESEARCH_USE_STATEMENT, width)), ha="center", va="bottom",
             fontsize=6.5, color="#b00000")
    fig.text(0.98, 0.006, f"page {page}/{total} - generated {generated}", ha="right", va="bottom", fontsize=6,
             color="#555555")


#: The summary table's entry for a muscle the model was never evaluated on with real data.
NOT_EVALUATED = "not evaluated"


def _summary_rows(stacks: list[ReportStack], held_out_dice: dict[int, float]) -> list[list[str]]:
    rows = []
    for s in stacks:
        for m in s.measurements:
            if not m.found:
                continue
            dice = held_out_dice.get(m.label)
            rows.append([str(s.volume.index), m.muscle, SHORT_SIDE.get(m.side, m.side), _fmt(m.volume_cm3, 1),
                         _fmt(m.mean_csa_mm2 / 100.0, 2), _fmt(m.max_csa_mm2 / 100.0, 2), _fmt(m.fat_fraction_pct, 1),
                         _fmt(m.pdff_pct, 1), m.goutallier_grade or "-", _fmt(m.asymmetry_index_pct, 1),
                         NOT_EVALUATED if dice is None else f"{dice:.2f}", _review_cell(m)])
    return rows


def _review_cell(m: MuscleMeasurement) -> str:
    """The summary table's quality-control cell: REVIEW or ok, with the outline uncertainty."""
    if m.quality is None:
        return "-"
    flag = "REVIEW" if m.quality.review_recommended else "ok"
    return flag if m.quality.uncertainty is None else f"{flag} ({m.quality.uncertainty:.2f})"


def review_lines(stacks: list[ReportStack]) -> list[str]:
    """One line per muscle flagged for review (any stack, found or not): who and why."""
    return [f"Stack {s.volume.index}, {m.muscle} {m.side}: {'; '.join(m.quality.reasons)}"
            for s in stacks for m in s.measurements if m.quality is not None and m.quality.review_recommended]


def _combined(stacks: list[ReportStack]) -> dict[tuple[str, str], dict]:
    """Per muscle and side over all stacks: volume-weighted fat fraction and PDFF."""
    out: dict[tuple[str, str], dict] = {}
    for s in stacks:
        for m in s.measurements:
            if not m.found:
                continue
            entry = out.setdefault((m.muscle, m.side), {"v": 0.0, "ff": 0.0, "pv": 0.0, "pd": 0.0, "label": m.label})
            entry["v"] += m.volume_cm3
            entry["ff"] += (m.fat_fraction_pct or 0.0) * m.volume_cm3
            if m.pdff_pct is not None:
                entry["pv"] += m.volume_cm3
                entry["pd"] += m.pdff_pct * m.volume_cm3
    for entry in out.values():
        entry["fat_fraction_pct"] = entry["ff"] / entry["v"] if entry["v"] else None
        entry["pdff_pct"] = entry["pd"] / entry["pv"] if entry["pv"] else None
    return out


def _bar_chart(ax, stacks: list[ReportStack], colours: dict[int, tuple[float, float, float]], method: str) -> None:
    combined = _combined(stacks)
    muscles = list(dict.fromkeys(muscle for muscle, _ in combined))
    width = 0.38
    any_pdff = False
    for i, muscle in enumerate(muscles):
        for j, side in enumerate(("right", "left")):
            entry = combined.get((muscle, side))
            if entry is None or entry["fat_fraction_pct"] is None:
                continue
            x = i + (j - 0.5) * width
            value = entry["fat_fraction_pct"]
            ax.bar(x, value, width * 0.92, color=colours.get(entry["label"], (0.5, 0.5, 0.5)), edgecolor="black",
                   linewidth=0.6)
            ax.text(x, value + 0.8, f"{SHORT_SIDE[side]}\n{value:.1f}", ha="center", va="bottom", fontsize=7)
            if entry["pdff_pct"] is not None:
                any_pdff = True
                ax.plot([x], [entry["pdff_pct"]], marker="D", color="black", markersize=5, linestyle="none")
    top = max([e["fat_fraction_pct"] or 0 for e in combined.values()]
              + [e["pdff_pct"] or 0 for e in combined.values()] + [12.0])
    ymax = min(100.0, top * 1.35 + 2)
    ax.set_ylim(0, ymax)
    for y, text in ((10.0, "10 %"), (50.0, "50 %")):
        if y < ymax:
            ax.axhline(y, color="#888888", linestyle="--", linewidth=0.7)
            ax.text(1.005, y, text, transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=6.5,
                    color="#555555")
    ax.set_xticks(range(len(muscles)))
    ax.set_xticklabels(muscles, fontsize=8)
    ax.set_xlim(-0.6, len(muscles) - 0.4)
    ax.set_ylabel("fat fraction (%)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    title = f"Fat fraction per muscle and side (bars: {method}"
    title += "; diamonds: Dixon PDFF)" if any_pdff else ")"
    ax.set_title(title, fontsize=8.5)
    if len(stacks) > 1:
        ax.text(0.0, -0.16, "Volume-weighted over all stacks.", transform=ax.transAxes, fontsize=6.5)


def pdff_erosion_text(stacks: list[ReportStack]) -> str:
    """How the Dixon PDFF was measured: the mean in each muscle's mask eroded in-plane by N voxels."""
    depth = next((m.pdff_erosion_voxels for s in stacks for m in s.measurements if m.pdff_pct is not None), 0)
    if not depth:
        return "mean over the whole muscle mask, not eroded"
    return f"mean in each muscle mask eroded in-plane by {depth} voxel{'s' if depth > 1 else ''}, away from its edge"


def _summary_page(pdf, source: Dataset, stacks: list[ReportStack], labels: tuple[LabelInfo, ...],
                  ctx: ReportContext, page: int, total: int, generated: str) -> None:
    fig = plt.figure(figsize=A4_PORTRAIT)
    fig.text(0.06, 0.955, "Lumbar paraspinal muscles: size and fat", fontsize=15, weight="bold")
    fig.text(0.06, 0.93, "RESEARCH USE ONLY - not for diagnosis", fontsize=10, weight="bold", color="#b00000")
    first = stacks[0].volume
    method = method_description(ctx.fat_method, ctx.bias_correction)
    dixon = next((m.pdff_source for s in stacks for m in s.measurements if m.pdff_source), None)
    level = next((m.level_method for s in stacks for m in s.measurements if m.found), "")
    lines = [
        ("Patient", f"{_text(source, 'PatientName')}   ID {_text(source, 'PatientID')}   "
                    f"born {_date(_text(source, 'PatientBirthDate', ''))}   sex {_text(source, 'PatientSex')}"),
        ("Study", f"{_date(_text(source, 'StudyDate', ''))}   accession {_text(source, 'AccessionNumber')}   "
                  f"{_text(source, 'StudyDescription', '')}"),
        ("Series analysed", f"{_text(source, 'SeriesNumber')} '{_text(source, 'SeriesDescription', '')}', "
                            f"{len(stacks)} stack(s), {sum(s.volume.n_slices for s in stacks)} slices, pixel "
                            f"{first.pixel_spacing_mm[0]:.2f} x {first.pixel_spacing_mm[1]:.2f} mm, slice step "
                            f"{first.slice_step_mm:.1f} mm"),
        ("Segmentation model", f"{ctx.model_name} {ctx.model_version} (weights sha256 {ctx.weights_sha256[:12]})"),
        ("Fat method (T2)", method),
        ("Dixon PDFF", (f"F/(W+F) from series '{dixon.get('water_series_description', '')}' / "
                        f"'{dixon.get('fat_series_description', '')}'; {pdff_erosion_text(stacks)}") if dixon else
         "not measured (no Dixon water and fat series on the same frame of reference)"),
        ("Slice location", level),
    ]
    y = 0.895
    for name, value in lines:
        wrapped = textwrap.wrap(value, 100) or ["-"]
        fig.text(0.06, y, name, fontsize=8, weight="bold", va="top")
        fig.text(0.25, y, "\n".join(wrapped), fontsize=8, va="top", linespacing=1.3)
        y -= 0.0165 * len(wrapped) + 0.006
    columns = ["stack", "muscle", "side", "volume\ncm³", "mean CSA\ncm²", "max CSA\ncm²", "fat\nfraction %",
               "Dixon\nPDFF %", "Goutallier\n(simplified)", "L/R asym.\n% (volume)", "model Dice\n(held-out)",
               "QC (outline\nuncertainty)"]
    widths = [0.045, 0.15, 0.04, 0.07, 0.075, 0.075, 0.075, 0.07, 0.1, 0.08, 0.1, 0.11]
    rows = _summary_rows(stacks, ctx.held_out_dice)
    row_h = 0.021
    height = row_h * (len(rows) + 2)
    y -= 0.015
    ax = fig.add_axes([0.06, y - height, 0.88, height])
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=columns, colWidths=[w / sum(widths) for w in widths],
                     loc="upper center", cellLoc="center", bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(7.0)
    colours = {info.value: tuple(c / 255.0 for c in info.color_rgb) for info in labels}
    for (r, c), cell in table.get_celld().items():
        cell.set_linewidth(0.3)
        if r == 0:
            cell.set_facecolor("#e8e8e8")
        elif c == 1:
            label = next((m.label for s in stacks for m in s.measurements
                          if m.found and m.muscle == rows[r - 1][1] and SHORT_SIDE.get(m.side) == rows[r - 1][2]), None)
            if label in colours:
                cell.set_facecolor((*colours[label], 0.35))
        elif c == len(columns) - 1 and rows[r - 1][c].startswith("REVIEW"):
            cell.set_facecolor("#ffd9d9")
            cell.get_text().set_weight("bold")
    flagged = review_lines(stacks)
    if flagged:
        y -= height + 0.012
        text = "\n".join(line for entry in ["Review recommended (quality control):"] + flagged
                         for line in textwrap.wrap(entry, 120))
        fig.text(0.06, y, text, fontsize=7.2, va="top", color="#900000", linespacing=1.3)
        height = 0.0125 * (text.count("\n") + 1)
    y -= height + 0.05
    notes = _page1_notes(stacks, ctx)
    # The notes sit on the footer and the chart on the notes, so extra notes (ctx.notes) push the
    # chart up instead of running into the research-use footer.
    notes_bottom, notes_size, notes_spacing = 0.055, 6.8, 1.3
    line_height = notes_size * notes_spacing / 72.0 / fig.get_figheight()  # points -> figure fraction
    chart_bottom = notes_bottom + line_height * (notes.count("\n") + 1) + 0.045
    ax2 = fig.add_axes([0.1, chart_bottom, 0.84, max(0.2, min(0.38, y - chart_bottom))])
    _bar_chart(ax2, stacks, colours, fat_method(ctx.fat_method).meaning)
    fig.text(0.06, notes_bottom, notes, fontsize=notes_size, va="bottom", linespacing=notes_spacing)
    _footer(fig, page, total, generated)
    pdf.savefig(fig)
    plt.close(fig)


BANDS_PER_PAGE = 3


def _draw_slice(ax, view: np.ndarray, lab: np.ndarray, lo: float, hi: float, colours: dict,
                fill: bool = True) -> None:
    """The slice in grey with the muscles filled in colour (``fill``) or outlined only, so the
    intramuscular fat stays visible."""
    ax.imshow(view, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="bilinear")
    if fill:
        overlay = np.zeros((*lab.shape, 4))
        for value, colour in colours.items():
            mask = lab == value
            if mask.any():
                overlay[mask] = (*colour, 0.40)
        ax.imshow(overlay, interpolation="nearest")
    for value, colour in colours.items():
        if (lab == value).any():
            ax.contour(lab == value, levels=[0.5], colors=[colour], linewidths=0.7 if fill else 1.3)
    ax.set_xticks([])
    ax.set_yticks([])
    for text, x, y, ha, va in (("R", 0.01, 0.5, "left", "center"), ("L", 0.99, 0.5, "right", "center"),
                               ("A", 0.5, 0.99, "center", "top"), ("P", 0.5, 0.01, "center", "bottom")):
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=8, weight="bold")


def _zoom_on_muscles(view: np.ndarray, lab: np.ndarray, margin_px: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.flatnonzero((lab > 0).any(axis=1)), np.flatnonzero((lab > 0).any(axis=0))
    if rows.size == 0:
        return view, lab
    r0, r1 = max(0, rows[0] - margin_px), min(view.shape[0], rows[-1] + margin_px + 1)
    c0, c1 = max(0, cols[0] - margin_px), min(view.shape[1], cols[-1] + margin_px + 1)
    return view[r0:r1, c0:c1], lab[r0:r1, c0:c1]


def _band_panels(stacks: list[ReportStack]) -> list[tuple]:
    """(stack, key slice, slices, z, levels, title) of each key image: one per lumbar level (head
    to feet), then one per ~30 mm band of the slices with muscle that have no level
    (:func:`paraspinal.key_slices.key_slices`, the slices the SR outlines too)."""
    panels = []
    for s in stacks:
        present = sorted({k for m in s.measurements if m.found for k in m.present_slices})
        z = next((m.slice_z_mm for m in s.measurements), [])
        levels = next((m.slice_level for m in s.measurements), [])
        for key in key_slices(z, levels, present, lambda k, s=s: float((s.labels[k] > 0).sum())):
            panels.append((s, key.index, list(key.slices), z, levels, key.title))
    return panels + _review_panels(stacks)


MAX_REVIEW_PANELS = 6


def _review_panels(stacks: list[ReportStack]) -> list[tuple]:
    """Key images for review: the most uncertain slice of each muscle flagged as uncertain
    (most uncertain first, at most MAX_REVIEW_PANELS)."""
    picks = []
    for s in stacks:
        z = next((m.slice_z_mm for m in s.measurements), [])
        levels = next((m.slice_level for m in s.measurements), [])
        for m in s.measurements:
            q = m.quality
            if q is None or not q.review_recommended or not q.uncertain_slices:
                continue
            key = max(q.uncertain_slices, key=lambda k: q.slice_uncertainty[k] or 0.0)
            title = f"review {m.muscle} {SHORT_SIDE.get(m.side, m.side)}, its most uncertain slice " \
                    f"({q.uncertainty_kind} {q.slice_uncertainty[key]:.2f})"
            picks.append((q.slice_uncertainty[key] or 0.0, (s, key, [key], z, levels, title)))
    picks.sort(key=lambda pair: -pair[0])
    return [panel for _, panel in picks[:MAX_REVIEW_PANELS]]


def _levels_determined(stacks: list[ReportStack]) -> bool:
    return any(m.level_measures for s in stacks for m in s.measurements if m.found)


def _key_image_pages(pdf, stacks: list[ReportStack], labels: tuple[LabelInfo, ...], page: int, total: int,
                     generated: str) -> int:
    """One row per slice band: the key slice whole (left) and zoomed on the muscles (right)."""
    panels = _band_panels(stacks)
    colours = {info.value: np.array(info.color_rgb, dtype=float) / 255.0 for info in labels}
    names = {info.value: f"{info.muscle} {SHORT_SIDE.get(info.side, info.side)}" for info in labels}
    for start in range(0, len(panels), BANDS_PER_PAGE):
        fig = plt.figure(figsize=A4_PORTRAIT)
        by_level = _levels_determined(stacks)
        fig.text(0.05, 0.962, "Key images: segmentation on the T2, one slice per "
                 + ("lumbar level" if by_level else "band of ~30 mm"), fontsize=11, weight="bold")
        fig.text(0.05, 0.953, "Radiological view: patient's right on the image's left, anterior up. Left: whole "
                 "section; right: zoom, outlines only (fat stays visible)."
                 + ("\nSlices without a level: one per band of ~30 mm." if by_level else ""), fontsize=7.5,
                 va="top")
        for j, (s, key, band, z, levels, title) in enumerate(panels[start:start + BANDS_PER_PAGE]):
            top = 0.915 - j * 0.29
            image = s.volume.pixels[key].astype(np.float64)
            inside = image[image > 0]
            lo, hi = (np.percentile(inside, [1, 99.5]) if inside.size else (0.0, 1.0))
            view, transform = radiological_view(s.volume, image)
            lab = transform(s.labels[key])
            body_view, body_lab = _crop_to_body(view, lab)
            margin = int(round(15.0 / max(0.1, min(s.volume.pixel_spacing_mm))))
            zoom_view, zoom_lab = _zoom_on_muscles(view, lab, margin)
            where = (f"z {z[key]:+.1f} mm, level {levels[key]}" if key < len(levels) and levels[key]
                     else f"z {z[key]:+.1f} mm (lumbar level not determined)")
            zs = [z[k] for k in band]
            fig.text(0.05, top, f"Stack {s.volume.index}, {title}: slices at z {min(zs):+.0f} to "
                     f"{max(zs):+.0f} mm - key slice {key + 1} of {s.volume.n_slices}, {where}", fontsize=8,
                     weight="bold", va="top")
            ax_body = fig.add_axes([0.03, top - 0.245, 0.52, 0.225])
            _draw_slice(ax_body, body_view, body_lab, lo, hi, colours)
            ax_zoom = fig.add_axes([0.57, top - 0.245, 0.40, 0.225])
            _draw_slice(ax_zoom, zoom_view, zoom_lab, lo, hi, colours, fill=False)
            found = [v for v in colours if (lab == v).any()]
            handles = [Patch(facecolor=colours[v], edgecolor="black", linewidth=0.3, label=names[v]) for v in found]
            if handles:
                fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, top - 0.247), ncol=8,
                           fontsize=6.5, frameon=False, handlelength=1.2, columnspacing=0.9)
        _footer(fig, page, total, generated)
        pdf.savefig(fig)
        plt.close(fig)
        page += 1
    return page


def _abbreviated(m: MuscleMeasurement) -> str:
    return _short(m).replace("erector spinae", "ES").replace("multifidus", "MF").replace(
        "psoas major", "PM").replace("quadratus lumborum", "QL")


def _level_rows(stacks: list[ReportStack]) -> list[tuple[ReportStack, list[MuscleMeasurement], list[str]]]:
    """Per stack with levels: its found muscles and its levels (head to feet)."""
    out = []
    for s in stacks:
        found = [m for m in s.measurements if m.found]
        names = sorted({lm.level for m in found for lm in m.level_measures}, key=level_sort_key)
        if names:
            out.append((s, found, names))
    return out


def _level_table_page_count(stacks: list[ReportStack]) -> int:
    return sum(int(math.ceil(len(names) / SLICE_ROWS_PER_PAGE)) for _, _, names in _level_rows(stacks))


def _level_table_pages(pdf, stacks: list[ReportStack], page: int, total: int, generated: str) -> int:
    """Per stack with lumbar levels: one row per level, mean CSA (mm²) / fat fraction (%) per muscle."""
    for s, found, names in _level_rows(stacks):
        any_pdff = any(lm.pdff_pct is not None for m in found for lm in m.level_measures)
        for start in range(0, len(names), SLICE_ROWS_PER_PAGE):
            fig = plt.figure(figsize=A4_LANDSCAPE)
            fig.text(0.04, 0.95, f"Per lumbar level, stack {s.volume.index}: mean CSA (mm²) / fat fraction (%) over "
                     "the slices at that level" + ("; Dixon PDFF (%) in brackets" if any_pdff else ""),
                     fontsize=10, weight="bold")
            fig.text(0.04, 0.905, "\n".join(textwrap.wrap(found[0].level_method, 190)), fontsize=6.5, va="bottom")
            columns = ["level", "slices"] + [_abbreviated(m) for m in found]
            cells = []
            for name in names[start:start + SLICE_ROWS_PER_PAGE]:
                slices = sorted({k for m in found for lm in m.level_measures if lm.level == name for k in lm.slices})
                row = [name, ", ".join(str(k + 1) for k in slices)]
                for m in found:
                    lm = next((x for x in m.level_measures if x.level == name), None)
                    if lm is None:
                        row.append("")
                        continue
                    text = f"{lm.mean_csa_mm2:.0f} / {_fmt(lm.fat_fraction_pct, 1)}"
                    if lm.pdff_pct is not None:
                        text += f" [{lm.pdff_pct:.1f}]"
                    row.append(text)
                cells.append(row)
            _grid_table(fig, [0.03, 0.08, 0.94, 0.80], columns, cells, row_scale=1.3)
            note = ("Levels from head to feet; a disc level (L4/L5) holds the slices through that disc, a vertebral "
                    "level (L4) the slices through that vertebral body; slices: numbers in the stack. MF multifidus, "
                    "ES erector spinae, PM psoas major, QL quadratus lumborum; R/L patient's right/left.")
            fig.text(0.04, 0.06, "\n".join(textwrap.wrap(note, 170)), fontsize=7, va="bottom")
            _footer(fig, page, total, generated)
            pdf.savefig(fig)
            plt.close(fig)
            page += 1
    return page


def _grid_table(fig, box: list[float], columns: list[str], cells: list[list[str]], row_scale: float) -> None:
    """A thin-ruled 7 pt table with a grey header row in ``box`` (figure fractions)."""
    ax = fig.add_axes(box)
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=columns, loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1.0, row_scale)
    for (r, _c), cell in table.get_celld().items():
        cell.set_linewidth(0.3)
        if r == 0:
            cell.set_facecolor("#e8e8e8")


def _slice_table_pages(pdf, stacks: list[ReportStack], page: int, total: int, generated: str) -> int:
    rows_per_page = SLICE_ROWS_PER_PAGE
    for s in stacks:
        found = [m for m in s.measurements if m.found]
        if not found:
            continue
        slices = sorted({k for m in found for k in m.present_slices}, key=lambda k: -found[0].slice_z_mm[k])
        for start in range(0, len(slices), rows_per_page):
            chunk = slices[start:start + rows_per_page]
            fig = plt.figure(figsize=A4_LANDSCAPE)
            fig.text(0.04, 0.95, f"Per slice, stack {s.volume.index}: CSA (mm²) / fat fraction (%)"
                     + ("; Dixon PDFF (%) in brackets" if any(m.pdff_pct is not None for m in found) else ""),
                     fontsize=10, weight="bold")
            fig.text(0.04, 0.912, "\n".join(textwrap.wrap(found[0].level_method, 190)), fontsize=6.5, va="bottom")
            columns = ["slice", "z (mm)", "level"] + [_abbreviated(m) for m in found]
            cells = []
            for k in chunk:
                row = [str(k + 1), f"{found[0].slice_z_mm[k]:+.1f}", found[0].slice_level[k] or "unknown"]
                for m in found:
                    if m.slice_csa_mm2[k] <= 0:
                        row.append("")
                        continue
                    text = f"{m.slice_csa_mm2[k]:.0f} / {_fmt(m.slice_fat_fraction_pct[k], 1)}"
                    if m.slice_pdff_pct and m.slice_pdff_pct[k] is not None:
                        text += f" [{m.slice_pdff_pct[k]:.1f}]"
                    row.append(text)
                cells.append(row)
            _grid_table(fig, [0.03, 0.08, 0.94, 0.82], columns, cells, row_scale=1.1)
            fig.text(0.04, 0.06, "Abbreviations: MF multifidus, ES erector spinae, PM psoas major, QL quadratus "
                     "lumborum; R/L patient's right/left. Slices ordered from head to feet.", fontsize=7)
            _footer(fig, page, total, generated)
            pdf.savefig(fig)
            plt.close(fig)
            page += 1
    return page


def _count_pages(stacks: list[ReportStack]) -> int:
    table_pages = 0
    for s in stacks:
        present = {k for m in s.measurements if m.found for k in m.present_slices}
        if present:
            table_pages += int(math.ceil(len(present) / SLICE_ROWS_PER_PAGE))
    return (1 + _level_table_page_count(stacks) + int(math.ceil(len(_band_panels(stacks)) / BANDS_PER_PAGE))
            + table_pages)


def render_report_pdf(source: Dataset, stacks: list[ReportStack], labels: tuple[LabelInfo, ...],
                      ctx: ReportContext, generated: str | None = None) -> bytes:
    """The report as PDF bytes. ``source``: a header of the analysed series (patient, study).

    The PDF carries no creation date in its metadata, so the same input gives the same bytes
    apart from the ``generated`` stamp printed in the footer (default: now, to the minute).
    """
    if not any(m.found for s in stacks for m in s.measurements):
        raise ValueError("no muscle was found: nothing to report")
    generated = generated or _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    total = _count_pages(stacks)
    buffer = io.BytesIO()
    with PdfPages(buffer, metadata={"Title": "Lumbar paraspinal muscle measurements (research use only)",
                                    "Creator": f"Paraspinal Muscle Node {ctx.software_version}".strip(),
                                    "CreationDate": None, "Subject": RESEARCH_USE_STATEMENT}) as pdf:
        _summary_page(pdf, source, stacks, labels, ctx, 1, total, generated)
        page = _level_table_pages(pdf, stacks, 2, total, generated)
        page = _key_image_pages(pdf, stacks, labels, page, total, generated)
        _slice_table_pages(pdf, stacks, page, total, generated)
    return buffer.getvalue()


# --- DICOM Encapsulated PDF -------------------------------------------------------------------

def encapsulated_pdf(pdf: bytes, source: Dataset, *, series_instance_uid: str, sop_instance_uid: str,
                     series_number: int, manufacturer: str, model_name: str, software_version: str,
                     referenced: Sequence[Dataset] = (), title: str = "Paraspinal muscle report (research use)",
                     series_description: str = "Paraspinal muscle report PDF (research use)") -> Dataset:
    """An Encapsulated PDF Storage instance (1.2.840.10008.5.1.4.1.1.104.1) in the source's study.

    Patient and study attributes are copied from ``source``; ``referenced`` (the SEG and SR the
    report was made from) are listed in SourceInstanceSequence.
    """
    now = _dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, source.get(keyword, ""))
    for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                    "AccessionNumber", "StudyDescription"):
        if keyword in source or keyword != "StudyDescription":
            setattr(ds, keyword, source.get(keyword, ""))
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description[:64]
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model_name[:64]
    ds.SoftwareVersions = software_version[:64]
    ds.ConversionType = "WSD"  # workstation: the document was produced by software
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the PDF shows patient name and ID
    ds.RecognizableVisualFeatures = "NO"
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = []
    if referenced:
        items = []
        for ref in referenced:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.SOPClassUID
            item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
            items.append(item)
        ds.SourceInstanceSequence = items
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    data = bytes(pdf)
    ds.EncapsulatedDocumentLength = len(data)
    ds.EncapsulatedDocument = data + (b"\x00" if len(data) % 2 else b"")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


class PdfFile:
    """The PDF bytes in the shape the results folder writes (an object with ``save_as``)."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def save_as(self, fp, enforce_file_format: bool = False) -> None:  # noqa: ARG002 (mirrors pydicom)
        fp.write(self.data)
