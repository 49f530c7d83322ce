"""Dixon PDFF in eroded muscle masks: the error by erosion depth, mean versus median.

    python -m tools.pdff_erosion [--model models/paraspinal_t2ax] [--depths 0 1 2 3] [--json OUT]

Research use only. What it does, through the node's own DICOM path (as ``tools.validate_fat``):

1. writes ONE study from the real MyoSegmenTUM tum01 case: the water + fat (in-phase-like) image
   as the T2-like series and the Dixon water and fat series;
2. lets the node's selector choose the T2-like series and :func:`paraspinal.dixon.find_dixon_pair`
   find the water/fat pair; the PDFF F / (W + F) is put on the T2 grid (:func:`pdff_on_stack`);
3. the reference per muscle and side: the mean PDFF inside the FULL manual mask (uneroded);
4. segments the T2-like series with the model bundle given (``--model``: a bundle folder or a models
   folder; it must be a model that never saw tum01, e.g. bundle 0.2.0 whose model card lists tum01
   as held out) and measures the PDFF inside each muscle's model mask eroded in-plane by each depth
   (:func:`paraspinal.quantification.eroded_in_plane`), as the mean and the median;
5. prints, per depth and statistic, the PDFF per muscle and side, its error against the reference
   (percentage points), the kept voxel share, and the mean absolute percentage error (MAPE) over
   the four muscles; the same for the manual masks eroded (how erosion alone moves the value).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from app.config import DEFAULT_MODEL_PATH, load_config
from paraspinal.dicom_index import index_folder
from paraspinal.dixon import find_dixon_pair, pdff_on_stack
from paraspinal.model_bundle import find_bundle, load_bundle
from paraspinal.nifti_to_dicom import DEFAULT_REAL_DATA_DIR
from paraspinal.quantification import pdff_in_mask
from paraspinal.series_selection import select_series
from paraspinal.stacks import load_stack
from tools.validate_fat import CASE, MUSCLES, labels_in_stack_order, write_dixon_study

STATISTICS = ("mean", "median")


def erosion_table(pdff: np.ndarray, masks: np.ndarray, reference: dict[int, float], depths: list[int]) -> list[dict]:
    """One row per (depth, statistic): per muscle the PDFF (%), error vs ``reference`` (pp), voxels
    kept and their share of the uneroded mask; the MAPE (%) over the muscles measured."""
    rows = []
    for depth in depths:
        measured = {label: pdff_in_mask(pdff, masks == label, depth) for label, _ in MUSCLES}
        for statistic in STATISTICS:
            cells, errors = {}, []
            for label, _ in MUSCLES:
                m = measured[label]
                value = m.mean_pct if statistic == "mean" else m.median_pct
                full = int((masks == label).sum())
                cell = {"pdff_pct": value, "voxels": m.voxels, "kept_share": m.voxels / full if full else 0.0,
                        "error_pp": None if value is None else round(value - reference[label], 2)}
                if value is not None:
                    errors.append(abs(value - reference[label]) / reference[label] * 100.0)
                cells[label] = cell
            rows.append({"depth": depth, "statistic": statistic, "muscles": cells,
                         "mape_pct": float(np.mean(errors)) if len(errors) == len(MUSCLES) else None,
                         "mean_abs_error_pp": float(np.mean([abs(c["error_pp"]) for c in cells.values()]))
                         if len(errors) == len(MUSCLES) else None})
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| erosion (voxels) | statistic | " + " | ".join(f"{name} PDFF % (error pp, voxels kept)"
                                                          for _, name in MUSCLES) + " | mean abs error pp | MAPE % |")
    print("|---|---|" + "---|" * len(MUSCLES) + "---|---|")
    for row in rows:
        cells = []
        for label, _ in MUSCLES:
            c = row["muscles"][label]
            cells.append("-" if c["pdff_pct"] is None else
                         f"{c['pdff_pct']:.1f} ({c['error_pp']:+.1f}, {c['voxels']} = {100 * c['kept_share']:.0f} %)")
        mae = "-" if row["mean_abs_error_pp"] is None else f"{row['mean_abs_error_pp']:.1f}"
        mape = "-" if row["mape_pct"] is None else f"{row['mape_pct']:.1f}"
        print(f"| {row['depth']} | {row['statistic']} | " + " | ".join(cells) + f" | {mae} | {mape} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.pdff_erosion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_REAL_DATA_DIR, help="folder of the real fixtures")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH,
                        help="model bundle (or a models folder holding one) that never saw tum01")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depths", type=int, nargs="*", default=[0, 1, 2, 3], help="erosion depths, voxels")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)

    bundle_dir = find_bundle(args.model)
    bundle = load_bundle(bundle_dir, args.device)
    held_out = (bundle.metadata.get("training") or {}).get("held_out", [])
    with tempfile.TemporaryDirectory(prefix="pdff_erosion_") as tmp:
        work = Path(tmp)
        case = write_dixon_study(args.data, work)["case"]
        (study,) = index_folder(work).studies.values()
        selection = select_series(study, load_config(environ={}).selection)
        if selection.chosen is None or selection.chosen.series_uid != case.series_uid:
            print(f"error: the selector did not choose the T2-like series: {selection.reason}", file=sys.stderr)
            return 1
        (plan,) = selection.chosen.stacks
        stack = load_stack(plan, selection.chosen.series_uid, 1)
        pair, why_not = find_dixon_pair(study, str(stack.datasets[0].FrameOfReferenceUID),
                                        {selection.chosen.series_uid})
        if pair is None:
            print(f"error: {why_not}", file=sys.stderr)
            return 1
        pdff = pdff_on_stack(pair, stack)
        manual = labels_in_stack_order(stack, case.paths, case.labels)
        from paraspinal.segmentation import segment_stack

        predicted = segment_stack(stack, bundle)
    reference = {label: pdff_in_mask(pdff, manual == label, 0).mean_pct for label, _ in MUSCLES}
    dice = {name: float(2 * ((predicted == label) & (manual == label)).sum()
                        / max(1, (predicted == label).sum() + (manual == label).sum())) for label, name in MUSCLES}
    print(f"case {CASE}: {stack.n_slices} slices {stack.pixels.shape[1]}x{stack.pixels.shape[2]}, "
          f"{stack.pixel_spacing_mm[0]:.3f} mm pixels; Dixon pair: {pair.reason}")
    print(f"model: {bundle.name} {bundle.version} ({bundle_dir}); held out in training: {held_out or 'not stated'}; "
          "Dice vs manual: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
    print("reference: mean PDFF in the full manual mask: "
          + ", ".join(f"{name} {reference[label]:.1f} %" for label, name in MUSCLES))
    report = {"case": CASE, "model": {"bundle": str(bundle_dir), "name": bundle.name, "version": bundle.version,
                                      "dice_vs_manual": dice},
              "reference_pdff_pct": {name: reference[label] for label, name in MUSCLES}, "runs": {}}
    for title, masks in ((f"model masks ({bundle.name} {bundle.version})", predicted), ("manual masks", manual)):
        rows = erosion_table(pdff, masks, reference, args.depths)
        print_table(f"Dixon PDFF in {title} eroded in-plane vs the full manual mask's mean PDFF", rows)
        report["runs"][title] = rows
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
