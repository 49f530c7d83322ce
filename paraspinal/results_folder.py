"""Writing one study's results folder atomically.

Everything is written into ``<out>/.incomplete-<study>-<pid>/`` and renamed to
``<out>/<study>/`` only when complete, so a folder named after a study is always whole.
An earlier result for the same study is replaced (moved aside, then deleted): the newest
analysis supersedes the old one. ``result.json`` is the contract read by the node and by
people: status (done / no_suitable_series / failed), reason, series decisions, outputs.

``measurements.csv`` has one row per muscle, side and stack (``level`` empty: the whole stack),
followed, where lumbar levels were determined, by one row per level holding the muscle
(``level`` "L4/L5" or "L4": mean CSA, fat fraction, PDFF and slice count over the slices at that
level; volume and maximum CSA empty). Each row carries the muscle's quality control
(``review_recommended`` yes/no, ``review_reasons``, ``outline_uncertainty`` 0..1; see
:mod:`paraspinal.quality`); ``result.json`` lists the muscles flagged for review.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from paraspinal.settings import RESEARCH_USE_STATEMENT

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

MEASUREMENT_COLUMNS = [
    "study_instance_uid", "series_instance_uid", "stack", "label", "muscle", "side", "level", "found",
    "volume_cm3", "mean_csa_mm2", "max_csa_mm2", "fat_fraction_pct", "fat_method", "bias_correction",
    "goutallier_grade", "asymmetry_index_pct", "pdff_pct", "pdff_median_pct", "pdff_voxels", "pdff_erosion_voxels",
    "n_slices_with_muscle", "level_method", "model_held_out_dice", "review_recommended", "review_reasons",
    "outline_uncertainty",
]


def safe_uid_component(uid: str) -> str:
    """A UID validated for use as a path component (digits and dots, at most 64 characters)."""
    if not (0 < len(uid) <= 64 and _UID_RE.match(uid)):
        raise ValueError(f"not a valid DICOM UID for a path: {uid!r}")
    return uid


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def measurement_rows(study_uid: str, stacks: list[dict[str, Any]],
                     held_out_dice: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One CSV row per muscle, side and stack, then one per lumbar level holding it.
    ``held_out_dice``: per label (as text), the model's Dice on held-out real data (model card);
    a muscle without one gets an empty ``model_held_out_dice``."""
    held_out_dice = held_out_dice or {}
    rows = []
    for stack in stacks:
        for m in stack["measurements"]:
            rows.append({
                "study_instance_uid": study_uid,
                "series_instance_uid": stack["series_instance_uid"],
                "stack": m["stack_index"],
                "label": m["label"],
                "muscle": m["muscle"],
                "side": m["side"],
                "level": "",
                "found": m["found"],
                "volume_cm3": m["volume_cm3"] if m["found"] else "",
                "mean_csa_mm2": m["mean_csa_mm2"] if m["found"] else "",
                "max_csa_mm2": m["max_csa_mm2"] if m["found"] else "",
                "fat_fraction_pct": m["fat_fraction_pct"] if m["found"] else "",
                "fat_method": m["fat_method"],
                "bias_correction": m.get("bias_correction", ""),
                "goutallier_grade": m.get("goutallier_grade") or "",
                "asymmetry_index_pct": "" if m.get("asymmetry_index_pct") is None else m["asymmetry_index_pct"],
                "pdff_pct": "" if m.get("pdff_pct") is None else m["pdff_pct"],
                "pdff_median_pct": "" if m.get("pdff_median_pct") is None else m["pdff_median_pct"],
                "pdff_voxels": m.get("pdff_voxels", "") if m.get("pdff_pct") is not None else "",
                "pdff_erosion_voxels": m.get("pdff_erosion_voxels", "") if m.get("pdff_pct") is not None else "",
                "n_slices_with_muscle": sum(1 for v in m["slice_csa_mm2"] if v > 0),
                "level_method": m.get("level_method", ""),
                "model_held_out_dice": held_out_dice.get(str(m["label"]), ""),
                **_quality_columns(m.get("quality")),
            })
            for lm in m.get("level_measures") or []:
                rows.append({
                    **{key: rows[-1][key] for key in ("study_instance_uid", "series_instance_uid", "stack", "label",
                                                      "muscle", "side", "found", "fat_method", "bias_correction",
                                                      "model_held_out_dice", "review_recommended",
                                                      "review_reasons", "outline_uncertainty")},
                    "level": lm["level"],
                    "volume_cm3": "",
                    "mean_csa_mm2": lm["mean_csa_mm2"],
                    "max_csa_mm2": "",
                    "fat_fraction_pct": "" if lm.get("fat_fraction_pct") is None else lm["fat_fraction_pct"],
                    "goutallier_grade": "",
                    "asymmetry_index_pct": "",
                    "pdff_pct": "" if lm.get("pdff_pct") is None else lm["pdff_pct"],
                    "pdff_median_pct": "",
                    "pdff_voxels": "",
                    "pdff_erosion_voxels": m.get("pdff_erosion_voxels", "") if lm.get("pdff_pct") is not None else "",
                    "n_slices_with_muscle": lm["n_slices_with_muscle"],
                    "level_method": m.get("level_method", ""),
                })
    return rows


def _quality_columns(quality: dict[str, Any] | None) -> dict[str, Any]:
    """The review flag's CSV columns (``paraspinal.quality.MuscleQuality`` as a dict)."""
    if not quality:
        return {"review_recommended": "", "review_reasons": "", "outline_uncertainty": ""}
    return {"review_recommended": "yes" if quality["review_recommended"] else "no",
            "review_reasons": "; ".join(quality["reasons"]),
            "outline_uncertainty": "" if quality.get("uncertainty") is None else quality["uncertainty"]}


def review_summary(stacks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The muscles flagged for review (for result.json): stack, muscle, side and reasons."""
    return [{"stack": m["stack_index"], "muscle": m["muscle"], "side": m["side"],
             "reasons": list(m["quality"]["reasons"])}
            for stack in stacks for m in stack["measurements"]
            if (m.get("quality") or {}).get("review_recommended")]


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MEASUREMENT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results_folder(out_dir: Path, study_uid: str, result: dict[str, Any],
                         dicom_objects: dict[str, Dataset], measurements: dict[str, Any] | None) -> Path:
    """Write result.json, the DICOM objects and measurements.json/csv, then publish atomically.

    Returns the final folder ``out_dir/<study_uid>``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / safe_uid_component(study_uid)
    staging = out_dir / f".incomplete-{study_uid}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    outputs = []
    for name, dataset in dicom_objects.items():
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        _fsync_write(staging / name, buffer.getvalue())
        outputs.append(name)
    if measurements is not None:
        _fsync_write(staging / "measurements.json", json.dumps(measurements, indent=2).encode())
        rows = measurement_rows(study_uid, measurements["stacks"],
                                (measurements.get("model") or {}).get("held_out_dice"))
        _fsync_write(staging / "measurements.csv", rows_to_csv(rows).encode())
        outputs += ["measurements.json", "measurements.csv"]
    result = dict(result, outputs=outputs, research_use=RESEARCH_USE_STATEMENT)
    if measurements is not None:
        result["review_recommended"] = review_summary(measurements["stacks"])
    _fsync_write(staging / "result.json", json.dumps(result, indent=2).encode())
    if final.exists():
        old = out_dir / f".superseded-{study_uid}-{os.getpid()}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final
