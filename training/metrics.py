"""Per-label agreement between a predicted and a reference 3D label volume.

Overlap metrics come from MONAI (DiceMetric, MeanIoU, ConfusionMatrixMetric) and the
boundary distance from MONAI's SurfaceDistanceMetric with the voxel spacing in mm, so
distances are physical. Definitions (TP, FP, FN, TN voxel counts of one label):

* Dice = 2TP / (2TP + FP + FN); Jaccard = TP / (TP + FP + FN)
* conformity = 1 - (FP + FN) / TP = (3 Dice - 2) / Dice (Chang et al. 2009; can be negative)
* TPR = TP / (TP + FN); TNR = TN / (TN + FP); PPV = TP / (TP + FP)
* volume ratio = predicted volume / reference volume
* mean boundary distance = average symmetric surface distance (mm): the mean, over the
  boundary voxels of both masks, of the distance to the other mask's boundary (MONAI
  ``SurfaceDistanceMetric(symmetric=True)``, 3D, anisotropic spacing honoured).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import ConfusionMatrixMetric, DiceMetric, MeanIoU, SurfaceDistanceMetric

from training.labels import label_name


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    """(spatial...) bool -> (1, 1, spatial...) float, the one-channel one-hot MONAI expects."""
    return torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.float32)[None, None]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> dict[str, float | None]:
    """Agreement of two boolean masks on the same grid (``spacing_mm`` per axis, mm)."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    out: dict[str, float | None] = {
        "volume_ref_ml": float(ref.sum()) * voxel_ml,
        "volume_pred_ml": float(pred.sum()) * voxel_ml,
    }
    out["volume_ratio"] = out["volume_pred_ml"] / out["volume_ref_ml"] if ref.any() else None
    if not ref.any() and not pred.any():
        return {**out, **{k: None for k in ("dice", "jaccard", "conformity", "tpr", "tnr", "ppv", "assd_mm")}}
    y_pred, y = _as_batch(pred), _as_batch(ref)
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)
    confusion = ConfusionMatrixMetric(include_background=True, metric_name=("sensitivity", "specificity", "precision"),
                                      reduction="none", compute_sample=False)
    confusion(y_pred, y)
    tpr, tnr, ppv = (float(t.reshape(-1)[0]) for t in confusion.aggregate())
    out["dice"] = float(dice.reshape(-1)[0])
    out["jaccard"] = float(iou.reshape(-1)[0])
    out["conformity"] = (3.0 * out["dice"] - 2.0) / out["dice"] if out["dice"] > 0 else None
    out["tpr"], out["tnr"] = tpr, tnr
    out["ppv"] = ppv if pred.any() else None
    if pred.any() and ref.any():
        distance = SurfaceDistanceMetric(include_background=True, symmetric=True, distance_metric="euclidean",
                                         reduction="none")(y_pred, y, spacing=[float(s) for s in spacing_mm])
        out["assd_mm"] = float(distance.reshape(-1)[0])
    else:
        out["assd_mm"] = None
    return out


def label_metrics(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int],
                  spacing_mm: Sequence[float]) -> list[dict[str, Any]]:
    """One row per label in ``labels``: :func:`binary_metrics` of ``pred == l`` vs ``ref == l``.

    A voxel the reference calls label ``l`` and the prediction calls an unevaluated label
    (psoas in a case without psoas annotation) counts as a miss for ``l``; predictions of
    unevaluated labels elsewhere do not count against anything.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} are on different grids")
    rows = []
    for value in labels:
        row: dict[str, Any] = {"label": int(value), "name": label_name(int(value))}
        row.update(binary_metrics(pred == value, ref == value, spacing_mm))
        rows.append(row)
    return rows


def mean_row(rows: Sequence[dict[str, Any]], name: str = "mean") -> dict[str, Any]:
    """Column means over ``rows`` (labels where a metric is undefined are skipped)."""
    out: dict[str, Any] = {"label": -1, "name": name}
    for key in rows[0] if rows else ():
        if key in ("label", "name"):
            continue
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def error_breakdown(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> list[dict[str, Any]]:
    """Where each label's disagreement goes, in voxels of the same grid (no spacing needed).

    Per label ``l`` in ``labels``: ``ref_voxels``; ``missed_to_background``: reference ``l`` the
    prediction calls background; ``missed_to_other``: reference ``l`` called another label,
    ``{label: voxels}``; ``extra_from_background``: predicted ``l`` where the reference says
    background (in a case that leaves a muscle unlabelled this includes that muscle);
    ``extra_from_other``: predicted ``l`` inside another reference label. Tells a boundary drawn
    elsewhere between two muscles (other) from a muscle drawn larger or smaller (background).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    rows = []
    for label in labels:
        in_ref, in_pred = ref == label, pred == label
        missed, extra = pred[in_ref & ~in_pred], ref[in_pred & ~in_ref]
        rows.append({
            "label": int(label), "name": label_name(int(label)), "ref_voxels": int(in_ref.sum()),
            "pred_voxels": int(in_pred.sum()),
            "missed_to_background": int((missed == 0).sum()),
            "missed_to_other": {int(v): int(n) for v, n in zip(*np.unique(missed[missed != 0], return_counts=True))},
            "extra_from_background": int((extra == 0).sum()),
            "extra_from_other": {int(v): int(n) for v, n in zip(*np.unique(extra[extra != 0], return_counts=True))},
        })
    return rows


def error_breakdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per label, the share of its reference voxels missed (to background, to each other
    label) and its predicted voxels' excess (from background, from other labels), in % of the
    reference volume."""
    lines = ["| label | reference voxels | missed to background | missed to other muscles | extra from background "
             "| extra from other muscles |", "|---|---|---|---|---|---|"]
    for r in rows:
        n = max(r["ref_voxels"], 1)

        def others(counts: dict[int, int]) -> str:
            return ", ".join(f"{label_name(k)} {100 * v / n:.1f} %" for k, v in sorted(counts.items())) or "0 %"

        lines.append(f"| {r['name']} | {r['ref_voxels']} | {100 * r['missed_to_background'] / n:.1f} % | "
                     f"{others(r['missed_to_other'])} | {100 * r['extra_from_background'] / n:.1f} % | "
                     f"{others(r['extra_from_other'])} |")
    return "\n".join(lines)

