"""Evaluate a bundle on labelled volumes it was not trained on.

Inference is the application's path: shared preprocessing (RAS, 1x1 mm in-plane, z-score)
-> the application's sliding-window inference (256x256 windows per axial slice, Gaussian blending, test-time
mirroring where the bundle uses it) -> softmax ->
``Invertd`` of the preprocessing back to the source voxel grid -> arg-max -> optional
post-processing (:func:`training.postprocess.postprocess_labels`). Metrics are computed on
the source grid with its own spacing (mm), per muscle and side (:mod:`training.metrics`).

Usage::

    python -m training.evaluate --bundle models/paraspinal_t2ax --case myosegmentum_tum01 \\
        --out output/evaluation/paraspinal_t2ax [--update-bundle]

Writes ``evaluation.md``, ``evaluation.csv``, ``evaluation.json`` and one overlay PNG per
case into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files only
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from monai.transforms import Invertd  # noqa: E402

from paraspinal.model_bundle import (METADATA_RELPATH, PADDING_MODES, ModelBundle, load_bundle,  # noqa: E402
                                     read_metadata)
from paraspinal.preprocessing import as_metatensor, model_space_transforms  # noqa: E402
from paraspinal.segmentation import ModelInput, SliceUncertainty, infer_with_uncertainty  # noqa: E402
from training.data import CaseError, LoadedCase, real_cases, site_cases, with_real_air  # noqa: E402
from training.metrics import error_breakdown, error_breakdown_table, label_metrics, mean_row  # noqa: E402
from training.model_card import METRIC_COLUMNS, metric_table  # noqa: E402
from training.postprocess import postprocess_labels  # noqa: E402

METHOD = (
    "Inference as in the application (paraspinal.segmentation): shared preprocessing (RAS, 1x1 mm in-plane, "
    "z-score over non-zero voxels), MONAI sliding window (256x256 windows per axial slice, Gaussian blending, "
    "padding with the volume minimum), softmax, averaged with the mirrored, label-swapped prediction where the "
    "bundle uses test-time mirroring, Invertd back to the source grid, arg-max, then post-processing "
    "(largest 3D component per label + per-slice hole filling). Metrics per muscle and side on the source grid "
    "(MONAI DiceMetric, MeanIoU, ConfusionMatrixMetric, SurfaceDistanceMetric with voxel spacing in mm; "
    "conformity = (3 Dice - 2) / Dice; volume ratio = predicted / reference volume; mean boundary distance = "
    "average symmetric surface distance). Only the labels the reference annotates are scored."
)


def predict_probabilities(case: LoadedCase, bundle: ModelBundle) -> tuple[np.ndarray, SliceUncertainty]:
    """Softmax probabilities (C, I, J, K) on the case's source grid, by the application's own
    inference (:func:`paraspinal.segmentation.infer_with_uncertainty`: sliding window per axial
    slice, test-time mirroring when the bundle asks for it), and the per-slice uncertainty
    (slices in the case's K order)."""
    transforms = model_space_transforms(bundle.preprocessing, ("image",))
    data = transforms({"image": as_metatensor(case.image, case.affine_ras)})
    probs, uncertainty = infer_with_uncertainty(ModelInput(data=data, transforms=transforms), bundle)
    data["pred"] = probs
    inverted = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=False,
                       to_tensor=True)(data)
    out = torch.as_tensor(inverted["pred"]).numpy()
    if out.shape[1:] != case.image.shape:
        raise RuntimeError(f"inverted prediction {out.shape[1:]} is not on the source grid {case.image.shape}")
    return out, uncertainty


def training_cases(bundle: ModelBundle) -> set[str]:
    """Case ids the bundle was trained on (its metadata's training cases and data lines): never
    evaluated on, a figure there would be meaningless."""
    training = bundle.metadata.get("training", {})
    return set(training.get("cases", [])) | {entry.split(": ")[0] for entry in training.get("data", [])}


def slice_records(case: LoadedCase, pred: np.ndarray, uncertainty: SliceUncertainty,
                  labels: Sequence[int]) -> list[dict[str, Any]]:
    """One record per (label, axial slice K) where the reference or the prediction has the label:
    Dice on that slice and the uncertainty scores, for the QC validation (training.qc_validation)."""
    records = []
    for label in labels:
        for k in range(case.image.shape[2]):
            ref, prd = case.label[:, :, k] == label, pred[:, :, k] == label
            n_ref, n_pred = int(ref.sum()), int(prd.sum())
            if n_ref == 0 and n_pred == 0:
                continue
            records.append({
                "label": int(label), "slice": k, "ref_voxels": n_ref, "pred_voxels": n_pred,
                "dice": round(2.0 * float((ref & prd).sum()) / float(n_ref + n_pred), 4),
                "mirror_disagreement": uncertainty.mirror_disagreement.get(label, [None] * (k + 1))[k],
                "entropy": uncertainty.entropy.get(label, [None] * (k + 1))[k],
            })
    return records


SYNTHETIC_TEST_PREFIX = "synthetic_test_"
SYNTHETIC_TEST_SEED = 99  # training renders its phantoms with the run's seed (0): never these


@dataclasses.dataclass(frozen=True)
class SyntheticTestCase:
    """``synthetic_test_<n>``: phantom volume n of seed 99, which no training run renders."""

    case_id: str

    def load(self) -> LoadedCase:
        from training.synthetic import synthetic_case

        try:
            index = int(self.case_id[len(SYNTHETIC_TEST_PREFIX):])
        except ValueError as exc:
            raise CaseError(f"{self.case_id}: expected {SYNTHETIC_TEST_PREFIX}<number>") from exc
        case = synthetic_case(index, seed=SYNTHETIC_TEST_SEED)
        return dataclasses.replace(case, case_id=self.case_id)


def _display(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient (I, J, K) to RAS, then to radiological display (rows anterior->posterior,
    columns patient right->left, i.e. the patient's right on the viewer's left)."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(volume, ornt)
    return ras.transpose(1, 0, 2)[::-1, ::-1, :]


def overlay_figure(case: LoadedCase, pred: np.ndarray, path: Path, title: str) -> None:
    """Three axial slices (25/50/75 % of the labelled extent): image, reference, prediction,
    cropped to the labelled region; patient's right on the viewer's left, anterior up."""
    from training.labels import label_table

    colours = np.zeros((9, 4))
    for key, entry in label_table()["labels"].items():
        colours[int(key), :3] = np.asarray(entry["color_rgb"]) / 255.0
        colours[int(key), 3] = 1.0
    cmap = ListedColormap(colours)
    image = _display(case.image, case.affine_ras)
    ref = _display(case.label, case.affine_ras)
    prd = _display(pred, case.affine_ras)
    labelled = np.flatnonzero(ref.reshape(-1, ref.shape[2]).any(axis=0))
    picks = [int(labelled[int(round(q * (len(labelled) - 1)))]) for q in (0.25, 0.5, 0.75)] if len(labelled) else [0]
    # Crop to the labels of either mask plus a margin, so small muscles stay visible and
    # every false positive is still in the picture.
    union = (ref > 0) | (prd > 0)
    rows_any, cols_any = np.flatnonzero(union.any(axis=(1, 2))), np.flatnonzero(union.any(axis=(0, 2)))
    margin = 25
    r0, r1 = max(0, rows_any.min() - margin), min(image.shape[0], rows_any.max() + margin + 1)
    c0, c1 = max(0, cols_any.min() - margin), min(image.shape[1], cols_any.max() + margin + 1)
    image, ref, prd = image[r0:r1, c0:c1], ref[r0:r1, c0:c1], prd[r0:r1, c0:c1]
    aspect = (r1 - r0) / max(1, c1 - c0)
    fig, axes = plt.subplots(len(picks), 3, figsize=(12, 4 * len(picks) * min(1.2, max(0.5, aspect))))
    axes = np.atleast_2d(axes)
    lo, hi = np.percentile(image, [1, 99.5])
    for row, k in enumerate(picks):
        for col, (overlay, name) in enumerate(((None, "image"), (ref, "reference"), (prd, "prediction"))):
            ax = axes[row, col]
            ax.imshow(image[:, :, k], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if overlay is not None:
                layer = np.ma.masked_equal(overlay[:, :, k], 0)
                ax.imshow(layer, cmap=cmap, vmin=0, vmax=8, alpha=0.45, interpolation="nearest")
            ax.set_title(f"{name}, slice {k}")
            ax.text(0.01, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=12, va="center")
            ax.text(0.97, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=12, va="center")
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _cropped(case: LoadedCase, box: tuple[slice, slice, slice]) -> LoadedCase:
    """``case`` restricted to the voxel ``box`` (I, J, K slices with starts), the affine moved to
    the box's first voxel so every voxel keeps its place in the world."""
    affine = case.affine_ras.copy()
    affine[:3, 3] = case.affine_ras[:3, :3] @ np.array([float(b.start or 0) for b in box]) + case.affine_ras[:3, 3]
    return dataclasses.replace(case, image=np.ascontiguousarray(case.image[box]), affine_ras=affine,
                               label=None if case.label is None else np.ascontiguousarray(case.label[box]),
                               components={k: np.ascontiguousarray(v[box]) for k, v in case.components.items()})


def _sub_stack(case: LoadedCase, start: int, stop: int) -> LoadedCase:
    """Slices ``start:stop`` (voxel axis K) of ``case`` as a volume of their own, in place."""
    return dataclasses.replace(_cropped(case, (slice(None), slice(None), slice(start, stop))), components={})


def field_of_view(case: LoadedCase, fov_mm: float, anterior_mm: float = 25.0) -> LoadedCase:
    """``case`` cropped in-plane to a square field of view ``fov_mm`` (mm) wide, as a clinical
    axial lumbar T2 is acquired: centred on the reference muscles' centroid moved ``anterior_mm``
    towards the patient's anterior (the spinal canal lies in front of the multifidus), clipped to
    the volume. Voxel axes 0 and 1 are cropped, the slices (axis 2) kept; the affine follows."""
    if case.label is None or not (case.label > 0).any():
        raise CaseError(f"{case.case_id}: a field-of-view crop is centred on the reference muscles; it has none")
    if fov_mm <= 0:
        raise CaseError(f"--fov-mm must be positive, got {fov_mm}")
    linear = case.affine_ras[:3, :3]
    spacing = np.sqrt((linear ** 2).sum(axis=0))
    centre = np.argwhere(case.label > 0).mean(axis=0) + np.linalg.solve(linear, np.array([0.0, anterior_mm, 0.0]))
    box = []
    for axis in (0, 1):
        n, size = case.image.shape[axis], int(round(fov_mm / spacing[axis]))
        start = int(np.clip(round(centre[axis] - size / 2.0), 0, max(0, n - size)))
        box.append(slice(start, min(n, start + size)))
    return _cropped(case, (box[0], box[1], slice(None)))


def predict_labels(case: LoadedCase, bundle: ModelBundle,
                   stack_length: int | None = None) -> tuple[np.ndarray, np.ndarray, SliceUncertainty]:
    """Raw and post-processed label maps (I, J, K) on the source grid, and the slice uncertainty.

    ``stack_length``: cut the volume into consecutive stacks of that many slices along voxel
    axis K and segment each on its own, as the application does with a series acquired as
    short stacks angled to each disc (own z-score, own post-processing, and for a 2.5D model
    the stack ends as neighbours); None: the whole volume at once.
    """
    k = case.image.shape[2]
    bounds = [(0, k)] if not stack_length else [(a, min(k, a + stack_length)) for a in range(0, k, stack_length)]
    raws, posts, parts = [], [], []
    for start, stop in bounds:
        part = case if (start, stop) == (0, k) else _sub_stack(case, start, stop)
        probs, uncertainty = predict_probabilities(part, bundle)
        raw = np.argmax(probs, axis=0).astype(np.uint8)
        raws.append(raw)
        posts.append(postprocess_labels(raw, part.spacing_mm))
        parts.append((stop - start, uncertainty))

    def joined(score: str) -> dict[int, list[float | None]]:
        # one list per label over all stacks; None where a stack does not predict the label
        labels = {label for _, u in parts for label in getattr(u, score)}
        return {label: [v for n, u in parts for v in getattr(u, score).get(label, [None] * n)] for label in labels}

    return (np.concatenate(raws, axis=2), np.concatenate(posts, axis=2),
            SliceUncertainty(mirror_disagreement=joined("mirror_disagreement"), entropy=joined("entropy")))


def evaluate_case(case: LoadedCase, bundle: ModelBundle, out_dir: Path,
                  stack_length: int | None = None) -> dict[str, Any]:
    """Metrics (raw and post-processed) and an overlay figure for one case (``stack_length``:
    see :func:`predict_labels`)."""
    if case.label is None:
        raise CaseError(f"{case.case_id}: no reference labels")
    started = time.monotonic()
    raw, post, uncertainty = predict_labels(case, bundle, stack_length)
    seconds = time.monotonic() - started
    labels = [c for c in case.labelled_classes if c != 0]
    raw_rows = label_metrics(raw, case.label, labels, case.spacing_mm)
    rows = label_metrics(post, case.label, labels, case.spacing_mm)
    figure = out_dir / f"{case.case_id.replace(':', '_')}_overlay.png"
    overlay_figure(case, post, figure, f"{case.case_id}: {bundle.name} {bundle.version} (post-processed)")
    return {
        "case": case.case_id, "source": case.source, "postprocessed": True,
        "spacing_mm": [round(s, 4) for s in case.spacing_mm], "shape": list(case.image.shape),
        "inference_s": round(seconds, 1),
        "rows": rows + [mean_row(rows)], "raw_rows": raw_rows + [mean_row(raw_rows)],
        "errors": error_breakdown(post, case.label, labels),
        "figure": figure.name, "test_time_mirror": bundle.test_time_mirror, "stack_length": stack_length,
        "padding": bundle.preprocessing.padding,
        "slices": slice_records(case, post, uncertainty, labels),
    }


def write_reports(results: list[dict[str, Any]], bundle: ModelBundle, out_dir: Path) -> None:
    """evaluation.md / .csv / .json in ``out_dir``."""
    keys = [key for key, _, _ in METRIC_COLUMNS]
    with open(out_dir / "evaluation.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["bundle", "weights_sha256", "case", "postprocessed", "label", "name", *keys])
        for result in results:
            for variant, rows in (("yes", result["rows"]), ("no", result["raw_rows"])):
                for row in rows:
                    writer.writerow([bundle.name, bundle.weights_sha256[:16], result["case"], variant, row["label"],
                                     row["name"], *["" if row.get(k) is None else f"{row[k]:.6g}" for k in keys]])
    lines = [
        f"# Evaluation of {bundle.name} {bundle.version}",
        "",
        f"Weights: `{bundle.path.name}/models/model.ts`, sha256 `{bundle.weights_sha256[:16]}…`. "
        f"Trained on: {'; '.join(bundle.metadata.get('training', {}).get('data', []))}.",
        "",
        METHOD,
        "",
    ]
    for result in results:
        lines += [
            f"## {result['case']}",
            "",
            f"Data: {result['source']}. Grid {result['shape']} voxels, spacing {result['spacing_mm']} mm. "
            f"Inference {result['inference_s']} s on CPU; slices smaller than the window padded by "
            f"{result.get('padding', 'minimum')}."
            + (f" Cropped in-plane to a {result['fov_mm']:g} mm field of view around the spine (--fov-mm)."
               if result.get("fov_mm") else "")
            + (f" Segmented as stacks of {result['stack_length']} slices (--stack-length)."
               if result.get("stack_length") else "")
            + (f" Zero-valued background filled with Rayleigh noise, {result['background_noise_pct']:g} % of the "
               "median intensity (--background-noise)." if result.get("background_noise_pct") else ""),
            "",
            "Post-processed (as the application outputs):",
            "",
            metric_table(result["rows"]),
            "",
            "Raw arg-max (no post-processing):",
            "",
            metric_table(result["raw_rows"]),
            "",
            "Where the post-processed disagreement goes (% of each muscle's reference volume):",
            "",
            error_breakdown_table(result["errors"]),
            "",
            f"![overlay]({result['figure']})",
            "",
        ]
    (out_dir / "evaluation.md").write_text("\n".join(lines))
    (out_dir / "evaluation.json").write_text(json.dumps(
        {"bundle": bundle.name, "version": bundle.version, "weights_sha256": bundle.weights_sha256,
         "method": METHOD, "cases": results}, indent=2))


def update_bundle(bundle: ModelBundle, results: list[dict[str, Any]], out_dir: Path) -> None:
    """Store the measured table in the bundle metadata, re-render the card, copy the reports."""
    from training.export import write_metadata

    metadata = read_metadata(bundle.path)
    previous = metadata.get("evaluation", {})
    metadata["evaluation"] = {
        "measured": True,
        "weights_sha256": bundle.weights_sha256,
        "method": METHOD,
        "cases": results,
        # Recipe checks (other folds, ablations) are about the recipe, not these weights: kept.
        "recipe_checks": previous.get("recipe_checks", []),
    }
    write_metadata(bundle.path, metadata)
    docs = bundle.path / "docs" / "evaluation"
    docs.mkdir(parents=True, exist_ok=True)
    for name in ["evaluation.md", "evaluation.csv"] + [r["figure"] for r in results]:
        shutil.copy2(out_dir / name, docs / name)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--case", action="append", required=True, help="case id (repeatable)")
    p.add_argument("--data-dir", type=Path, default=None, help="site cases (<case>_image/_label.nii.gz)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default output/evaluation/<bundle>)")
    p.add_argument("--update-bundle", action="store_true",
                   help="write the figures into the bundle metadata and model card")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stack-length", type=int, default=None,
                   help="segment the volume as consecutive stacks of this many slices, each on its own "
                        "(series acquired as short stacks angled to each disc)")
    p.add_argument("--fov-mm", type=float, default=None,
                   help="crop each case in-plane to a square field of view this wide (mm) around the spine, as "
                        "clinical axial T2 is often acquired (160-220 mm), before segmenting it")
    p.add_argument("--background-noise", type=float, default=None, metavar="PERCENT",
                   help="fill a case's masked (exactly-0) background with Rayleigh noise of this percent of "
                        "its median intensity, as a real scan's air, before segmenting it (cases without one: "
                        "unchanged)")
    p.add_argument("--test-time-mirror", choices=("bundle", "on", "off"), default="bundle",
                   help="override the bundle's test-time mirroring (ablation); default: as the bundle says")
    p.add_argument("--padding", choices=("bundle",) + PADDING_MODES, default="bundle",
                   help="override how the bundle pads slices smaller than its window (ablation); "
                        "default: as the bundle says (preprocessing.padding)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle, "cpu")
    if args.test_time_mirror != "bundle":
        bundle = dataclasses.replace(bundle, test_time_mirror=args.test_time_mirror == "on")
    if args.padding != "bundle":
        bundle = dataclasses.replace(bundle, preprocessing=dataclasses.replace(bundle.preprocessing,
                                                                               padding=args.padding))
    trained_on = training_cases(bundle)
    registry: dict[str, Any] = dict(real_cases())
    if args.data_dir:
        registry.update(site_cases(args.data_dir))
    out_dir = args.out or Path("output") / "evaluation" / bundle.path.name
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for case_id in args.case:
        if case_id.startswith(SYNTHETIC_TEST_PREFIX):
            registry[case_id] = SyntheticTestCase(case_id)
        if case_id not in registry:
            print(f"error: unknown case {case_id!r}; known: {sorted(registry)}", file=sys.stderr)
            return 2
        if case_id in trained_on:
            print(f"error: {case_id} is in this bundle's training data; evaluating on it would be meaningless",
                  file=sys.stderr)
            return 2
        case = registry[case_id].load()
        noisy_air = None
        if args.background_noise:
            filled = with_real_air(case, args.background_noise)
            noisy_air = args.background_noise if filled is not case else None  # only a masked background
            case = filled
        if args.fov_mm:
            case = field_of_view(case, args.fov_mm)
        result = evaluate_case(case, bundle, out_dir, args.stack_length)
        result["fov_mm"] = args.fov_mm
        result["background_noise_pct"] = noisy_air
        results.append(result)
        print(f"{case_id}: post-processed mean Dice {result['rows'][-1]['dice']:.3f} "
              f"(raw {result['raw_rows'][-1]['dice']:.3f})")
    write_reports(results, bundle, out_dir)
    if args.update_bundle:
        update_bundle(bundle, results, out_dir)
    print(f"reports: {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
