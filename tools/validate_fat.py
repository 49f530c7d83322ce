"""Validate the T2 fat methods against Dixon PDFF on the real MyoSegmenTUM case.

    python -m tools.validate_fat [--work DIR] [--model PATH|none] [--json OUT] [--no-n4]

What it does, end to end through the node's own DICOM path:

1. writes ONE study: the MyoSegmenTUM tum01 water + fat image as the T2-like series (fat is
   bright, as on T2 TSE; :func:`paraspinal.nifti_to_dicom.real_case_series`), and the Dixon
   water and fat images as two more series (ImageType DERIVED/PRIMARY/DIXON/WATER|FAT, TE 2.5 ms,
   same frame of reference, one common intensity scale so F / (W + F) is preserved);
2. indexes the folder and lets the node's series selector choose the T2 (it must not choose a
   Dixon series) and :func:`paraspinal.dixon.find_dixon_pair` find the water/fat pair;
3. measures every fat method (with and without N4) inside the manual erector spinae and
   multifidus masks, and the Dixon PDFF inside the same masks as the reference;
4. if a model bundle is present (``models/``, e.g. ``models/paraspinal_t2ax``), does the same
   inside the masks the model segments on the DICOM-wrapped T2-like series;
5. as a plausibility check without reference, prints every method's fat fraction of the eight
   muscles of the MuscleMap TSE sample (reference masks).

Per muscle and method it prints the mean absolute percentage error over slices,
MAPE = mean_k |FF_k - PDFF_k| / PDFF_k x 100 %, and the bias mean_k (FF_k - PDFF_k) in
percentage points, over the slices where the muscle has at least ``--min-voxels`` voxels.
The published figures beside them (Xu et al.: threshold methods 47-62 % MAPE, learned fat model
22-35 %) were measured against manual fat annotation on T2, not against PDFF: a context, not
the same test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from app.config import DEFAULT_MODEL_PATH, load_config
from paraspinal.dicom_index import index_folder
from paraspinal.dicom_series_writer import SeriesInfo, StudyInfo, stack_geometry_from_affine, write_mr_series
from paraspinal.dixon import find_dixon_pair, pdff_on_stack
from paraspinal.fat_methods import FAT_METHODS, FatInput, fat_signal_share, n4_bias_correct, run_signal_fraction
from paraspinal.model_bundle import BundleError, LabelInfo, find_bundle, parse_labels
from paraspinal.nifti_to_dicom import DEFAULT_REAL_DATA_DIR, dicom_grid, nifti_affine_to_lps, real_case_series
from paraspinal.quantification import measure_stack
from paraspinal.series_selection import select_series
from paraspinal.stacks import StackVolume, load_stack

CASE = "myosegmentum_tum01"
#: The muscles with manual masks in this case, in table order (project labels).
MUSCLES = ((3, "ES R"), (4, "ES L"), (1, "MF R"), (2, "MF L"))
PUBLISHED = {"classification": "threshold methods 47-62 %", "continuous": "(learned fat model 22-35 %)",
             "diagnostic": "not a product method (see below)"}
#: The signal-weighted share, shown for comparison only (fat_methods.fat_signal_share).
DIAGNOSTIC = "signal_weighted*"
LABELS_JSON = Path(__file__).resolve().parents[1] / "training" / "labels.json"


def label_table() -> tuple[LabelInfo, ...]:
    """The project's label table (as written into every bundle)."""
    return parse_labels(json.loads(LABELS_JSON.read_text()))


def write_dixon_study(data_dir: Path, out_dir: Path) -> dict:
    """The T2-like series plus the Dixon water and fat series, one study; returns what was written."""
    study = StudyInfo(patient_name=f"REAL^{CASE}", patient_id=CASE.upper(), accession_number=CASE[:16],
                      study_description="MRI LUMBAR SPINE")
    case = real_case_series(CASE, out_dir / "03_t2like", study=study, data_dir=data_dir)
    water_img = nib.load(str(data_dir / f"{CASE}_water.nii.gz"))
    water = np.asarray(water_img.dataobj, dtype=np.float64)
    fat = np.asarray(nib.load(str(data_dir / f"{CASE}_fat.nii.gz")).dataobj, dtype=np.float64)
    # One scale for both keeps F / (W + F); the fat file's origin differs from the water/label files'
    # (see nifti_to_dicom), the water affine is the grid of all three.
    scale = np.floor(65000.0 / max(water.max(), fat.max()))
    affine = nifti_affine_to_lps(water_img.affine)
    geometry = stack_geometry_from_affine(affine, water.shape[2], rows=water.shape[1], cols=water.shape[0])
    for number, kind, volume in ((10, "WATER", water), (11, "FAT", fat)):
        info = SeriesInfo(series_number=number, series_description=f"t1_vibe_dixon_tra_{kind[0]}",
                          protocol_name="t1_vibe_dixon_tra", image_type=("DERIVED", "PRIMARY", "DIXON", kind),
                          echo_time=2.46, repetition_time=6.0, echo_train_length=1, flip_angle=3.0,
                          scanning_sequence=("GR",), sequence_variant=("SP",), mr_acquisition_type="3D",
                          sequence_name="*fl3d6")
        write_mr_series(dicom_grid(np.rint(volume * scale)), geometry, out_dir / f"{number}_dixon_{kind.lower()}",
                        study=study, series=info)
    return {"case": case, "scale": float(scale)}


def labels_in_stack_order(stack: StackVolume, paths: list[Path], labels: np.ndarray) -> np.ndarray:
    order = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): k for k, p in enumerate(paths)}
    return np.stack([labels[order[str(ds.SOPInstanceUID)]] for ds in stack.datasets])


def errors_vs_pdff(measures, min_voxels: int, pixel_area: float) -> dict[int, dict]:
    """Per muscle: MAPE (%) and bias (percentage points) of the slice fat fractions vs slice PDFF."""
    out = {}
    for m in measures:
        if m.label not in dict(MUSCLES) or not m.found:
            continue
        pairs = [(ff, pd) for ff, pd, csa in zip(m.slice_fat_fraction_pct, m.slice_pdff_pct, m.slice_csa_mm2)
                 if ff is not None and pd is not None and pd > 0 and csa >= min_voxels * pixel_area]
        if not pairs:
            continue
        ff, pd = np.array(pairs).T
        out[m.label] = {"mape_pct": float(np.mean(np.abs(ff - pd) / pd) * 100.0), "bias_pp": float(np.mean(ff - pd)),
                        "n_slices": len(pairs), "ff_pct": m.fat_fraction_pct, "pdff_pct": m.pdff_pct}
    return out


def _signal_weighted(measures, volume: StackVolume, labels: np.ndarray, pixel_area: float):
    """The same measures with the diagnostic signal-weighted share (not a product method)."""
    found = tuple(m.label for m in measures if m.found)
    share = run_signal_fraction(FatInput(volume.pixels, labels, found, volume.pixel_spacing_mm),
                                share_of=fat_signal_share).share
    out = []
    for m in measures:
        fat = np.where(labels == m.label, share, 0.0).sum(axis=(1, 2))
        voxels = (labels == m.label).sum(axis=(1, 2))
        out.append(dataclasses.replace(m, slice_fat_fraction_pct=[
            100.0 * float(f) / float(v) if v else None for f, v in zip(fat, voxels)],
            fat_fraction_pct=100.0 * float(fat.sum()) / max(1, int(voxels.sum()))))
    return out


def evaluate_masks(stack: StackVolume, labels: np.ndarray, pdff: np.ndarray, table, methods, use_n4: bool,
                   min_voxels: int, pdff_source: dict) -> list[dict]:
    """One row per method (and N4 on/off): per-muscle errors vs PDFF inside ``labels``; last, the
    diagnostic signal-weighted share (see :func:`paraspinal.fat_methods.fat_signal_share`)."""
    rows = []
    variants = [("none", stack)]
    if use_n4:
        spacing = (stack.slice_step_mm, *stack.pixel_spacing_mm)
        corrected = dataclasses.replace(stack, pixels=n4_bias_correct(stack.pixels, spacing))
        variants.append(("n4", corrected))
    for bias, volume in variants:
        for key in list(methods) + [DIAGNOSTIC]:
            start = time.perf_counter()
            measures = measure_stack(volume, labels, table, "signal_fraction" if key == DIAGNOSTIC else key,
                                     pdff=pdff, pdff_source=pdff_source)
            if key == DIAGNOSTIC:
                measures = _signal_weighted(measures, volume, labels, stack.pixel_area_mm2)
            per_muscle = errors_vs_pdff(measures, min_voxels, stack.pixel_area_mm2)
            mapes = [v["mape_pct"] for v in per_muscle.values()]
            rows.append({"method": key, "bias_correction": bias,
                         "kind": "diagnostic" if key == DIAGNOSTIC else FAT_METHODS[key].kind,
                         "muscles": per_muscle, "mean_mape_pct": float(np.mean(mapes)) if mapes else None,
                         "seconds": round(time.perf_counter() - start, 2)})
    return rows


def plausibility_musclemap(data_dir: Path, out_dir: Path, table, methods) -> dict:
    """No reference here: the whole-stack fat fraction of the 8 muscles of the MuscleMap TSE
    sample (reference masks), N4 on, per method -- a plausibility check on a real T2-like TSE
    (psoas is the leanest lumbar muscle in adults)."""
    case = real_case_series("musclemap_sub0001", out_dir, data_dir=data_dir)
    (study,) = index_folder(out_dir).studies.values()
    selection = select_series(study, load_config(environ={}).selection)
    (plan,) = selection.chosen.stacks
    stack = load_stack(plan, selection.chosen.series_uid, 1)
    labels = labels_in_stack_order(stack, case.paths, case.labels)
    spacing = (stack.slice_step_mm, *stack.pixel_spacing_mm)
    corrected = dataclasses.replace(stack, pixels=n4_bias_correct(stack.pixels, spacing))
    rows = {}
    for key in list(methods) + [DIAGNOSTIC]:
        measures = measure_stack(corrected, labels, table, "signal_fraction" if key == DIAGNOSTIC else key)
        if key == DIAGNOSTIC:
            measures = _signal_weighted(measures, corrected, labels, stack.pixel_area_mm2)
        rows[key] = {m.name: round(m.fat_fraction_pct, 1) for m in measures if m.found}
    names = list(next(iter(rows.values())))
    short = {n: n.replace("erector spinae", "ES").replace("multifidus", "MF").replace("psoas major", "PM")
             .replace("quadratus lumborum", "QL").replace(" right", " R").replace(" left", " L") for n in names}
    lean = stack.pixels[np.isin(labels, [5, 6])]
    print(f"\nPlausibility on the MuscleMap TSE sample (reference masks, N4; no fat reference exists): "
          f"whole-stack fat fraction %; psoas median intensity {np.median(lean):.0f}")
    print(f"{'method':16s}" + "".join(f" {short[n]:>6s}" for n in names))
    for key, values in rows.items():
        print(f"{key:16s}" + "".join(f" {values[n]:6.1f}" for n in names))
    return rows


def print_table(title: str, rows: list[dict], reference: dict[int, float | None], n_slices: str) -> None:
    print(f"\n{title}")
    print(f"reference: Dixon PDFF in the same masks, whole stack: "
          + ", ".join(f"{name} {reference.get(label, float('nan')):.1f} %" for label, name in MUSCLES)
          + f"; {n_slices}")
    head = f"{'method':16s} {'N4':4s}" + "".join(f" {name + ' MAPE/bias':>19s}" for _, name in MUSCLES)
    print(head + f" {'mean MAPE':>10s}  published (Xu et al., vs manual annotation)")
    for row in rows:
        cells = []
        for label, _ in MUSCLES:
            v = row["muscles"].get(label)
            cells.append(f" {v['mape_pct']:8.1f} % {v['bias_pp']:+6.1f} pp" if v else f" {'-':>19s}")
        mean = f"{row['mean_mape_pct']:8.1f} %" if row["mean_mape_pct"] is not None else f"{'-':>10s}"
        print(f"{row['method']:16s} {'yes' if row['bias_correction'] == 'n4' else 'no':4s}" + "".join(cells)
              + f" {mean}  {PUBLISHED[row['kind']]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.validate_fat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_REAL_DATA_DIR, help="folder of the real fixtures")
    parser.add_argument("--work", type=Path, help="folder for the written DICOM study (default: a temporary one)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH),
                        help="model bundle or models folder for the model-mask run; 'none' to skip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="*", default=list(FAT_METHODS), choices=list(FAT_METHODS))
    parser.add_argument("--no-n4", action="store_true", help="skip the N4 variants (saves ~15 s per mask set)")
    parser.add_argument("--min-voxels", type=int, default=50,
                        help="slices where the muscle has fewer voxels are left out of MAPE/bias (default 50)")
    parser.add_argument("--no-musclemap", action="store_true", help="skip the MuscleMap plausibility check")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="validate_fat_") as tmp:
        work = args.work or Path(tmp)
        written = write_dixon_study(args.data, work)
        case = written["case"]
        (study,) = index_folder(work).studies.values()
        config = load_config(environ={})
        selection = select_series(study, config.selection)
        if selection.chosen is None or selection.chosen.series_uid != case.series_uid:
            print(f"error: the selector chose {selection.chosen and selection.chosen.description!r}, "
                  f"not the T2-like series: {selection.reason}", file=sys.stderr)
            return 1
        (plan,) = selection.chosen.stacks
        stack = load_stack(plan, selection.chosen.series_uid, 1)
        frame = str(stack.datasets[0].FrameOfReferenceUID)
        pair, why_not = find_dixon_pair(study, frame, {selection.chosen.series_uid})
        if pair is None:
            print(f"error: {why_not}", file=sys.stderr)
            return 1
        pdff = pdff_on_stack(pair, stack)
        manual = labels_in_stack_order(stack, case.paths, case.labels)
        table = label_table()
        rejected = [d for d in selection.decisions if d.series_uid in (pair.water.series_uid, pair.fat.series_uid)]
        print(f"case {CASE}: {stack.n_slices} slices {stack.pixels.shape[1]}x{stack.pixels.shape[2]}, "
              f"{stack.pixel_spacing_mm[0]:.3f} mm pixels, {stack.slice_step_mm:.1f} mm slice step")
        print(f"T2-like series chosen by the selector: '{selection.chosen.description}'; Dixon series not chosen: "
              + "; ".join(f"'{d.description}' ({d.reason})" for d in rejected))
        print(f"Dixon pair: {pair.reason}")
        report = {"case": CASE, "min_voxels": args.min_voxels, "dixon": pair.as_dict(), "runs": {}}

        runs = [("manual masks", manual)]
        model_note = ""
        if args.model.lower() != "none":
            try:
                bundle_dir = find_bundle(Path(args.model))
            except BundleError as exc:
                model_note = f"model-mask run skipped: {exc}"
            else:
                from paraspinal.model_bundle import load_bundle
                from paraspinal.segmentation import segment_stack

                bundle = load_bundle(bundle_dir, args.device)
                predicted = segment_stack(stack, bundle)
                predicted = np.where(np.isin(predicted, [label for label, _ in MUSCLES]), predicted, 0).astype(np.uint8)
                dice = {name: float(2 * ((predicted == label) & (manual == label)).sum()
                                    / max(1, (predicted == label).sum() + (manual == label).sum()))
                        for label, name in MUSCLES}
                model_note = (f"model masks: bundle {bundle.name} {bundle.version} ({bundle_dir}); Dice vs manual: "
                              + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
                report["model"] = {"bundle": str(bundle_dir), "name": bundle.name, "version": bundle.version,
                                   "dice_vs_manual": dice}
                runs.append((f"model masks ({bundle.name} {bundle.version})", predicted))
        for title, masks in runs:
            rows = evaluate_masks(stack, masks, pdff, table, args.methods, not args.no_n4, args.min_voxels,
                                  pair.as_dict())
            first = rows[0]["muscles"]
            reference = {label: v["pdff_pct"] for label, v in first.items()}
            counts = ", ".join(f"{name} {first[label]['n_slices']}" for label, name in MUSCLES if label in first)
            print_table(f"T2-like (W+F) fat fraction vs Dixon PDFF per slice -- {title}", rows, reference,
                        f"slices with >= {args.min_voxels} voxels: {counts}")
            report["runs"][title] = rows
        print(f"\n* {DIAGNOSTIC}: the signal_fraction share weighted by the compartments' signals (the fat share of "
              "the voxel's signal). It follows F/(W+F) here because the T2-like input IS W+F, with the Dixon "
              "images' own fat/muscle contrast; where fat is far brighter than muscle it turns noise in dark "
              "muscle into fat (see the MuscleMap check below), so it is not a product method.")
        if not args.no_musclemap:
            report["musclemap"] = plausibility_musclemap(args.data, work / "musclemap", table, args.methods)
        if model_note:
            print("\n" + model_note)
            report["model_note"] = model_note
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
