"""The cohort table of a run and its failure summary, streamed from the ledger.

``cohort.parquet`` and ``cohort.csv``: one row per study x muscle x side x level, i.e. each
study's ``measurements.csv`` rows (README "Measurements": per stack a whole-stack row with
``level`` empty, then one row per lumbar level holding the muscle) for every study whose
outcome is ``done``, in the ledger's order. Numeric columns are float64 in Parquet (empty:
null); the rest are strings. ``failures.csv`` lists each failed study with its attempts and
reason; ``summary.json`` counts studies by outcome and failures by reason.

Rows go out in batches of :data:`BATCH_ROWS`, so memory does not depend on the cohort's size.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from app.reanalyse.ledger import StudyLedger
from paraspinal.results_folder import MEASUREMENT_COLUMNS

BATCH_ROWS = 10_000
NUMERIC_COLUMNS = ("stack", "label", "volume_cm3", "mean_csa_mm2", "max_csa_mm2", "fat_fraction_pct",
                   "asymmetry_index_pct", "pdff_pct", "pdff_median_pct", "pdff_voxels", "pdff_erosion_voxels",
                   "n_slices_with_muscle", "model_held_out_dice", "outline_uncertainty")
COHORT_COLUMNS = list(MEASUREMENT_COLUMNS)
FAILURE_COLUMNS = ["study_uid", "attempts", "reason", "last_worker"]


def _number(text: Any) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _schema():
    import pyarrow as pa

    return pa.schema([(c, pa.float64() if c in NUMERIC_COLUMNS else pa.string()) for c in COHORT_COLUMNS])


def _flush(writer, batch: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    columns = {c: [(_number(r.get(c)) if c in NUMERIC_COLUMNS else (None if r.get(c) is None else str(r.get(c))))
                   for r in batch] for c in COHORT_COLUMNS}
    writer.write_table(pa.Table.from_pydict(columns, schema=_schema()))


def write_cohort(ledger: StudyLedger, workdir: Path) -> dict[str, Any]:
    """Write ``cohort.parquet``, ``cohort.csv``, ``failures.csv`` and ``summary.json`` into
    ``workdir`` (each atomically); returns the summary."""
    import pyarrow.parquet as pq

    workdir = Path(workdir)
    paths = {name: workdir / name for name in ("cohort.parquet", "cohort.csv", "failures.csv", "summary.json")}
    partial = {name: path.with_name(path.name + ".partial") for name, path in paths.items()}
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    n_rows = 0
    writer = pq.ParquetWriter(partial["cohort.parquet"], _schema())
    try:
        with open(partial["cohort.csv"], "w", newline="") as cohort_csv, \
                open(partial["failures.csv"], "w", newline="") as failures_csv:
            rows_out = csv.DictWriter(cohort_csv, COHORT_COLUMNS, extrasaction="ignore")
            rows_out.writeheader()
            failures_out = csv.DictWriter(failures_csv, FAILURE_COLUMNS, extrasaction="ignore")
            failures_out.writeheader()
            batch: list[dict[str, Any]] = []
            for record in ledger.records():
                outcomes[record["status"]] += 1
                if record["status"] == "failed":
                    worker = f"{record.get('host', '')}:{record.get('pid', '')}"
                    failures_out.writerow({**record, "last_worker": worker})
                    reasons[_reason_kind(record.get("reason", ""))] += 1
                    continue
                for row in record.get("rows", []) if record["status"] == "done" else []:
                    rows_out.writerow(row)
                    batch.append(row)
                    n_rows += 1
                    if len(batch) >= BATCH_ROWS:
                        _flush(writer, batch)
                        batch = []
            if batch:
                _flush(writer, batch)
    finally:
        writer.close()
    summary = {"studies": sum(outcomes.values()), "outcomes": dict(sorted(outcomes.items())),
               "failed": outcomes.get("failed", 0), "failure_reasons": dict(reasons.most_common(50)),
               "cohort_rows": n_rows, "files": {k: str(v) for k, v in paths.items()}}
    partial["summary.json"].write_text(json.dumps(summary, indent=2) + "\n")
    for name, path in paths.items():
        os.replace(partial[name], path)
    return summary


def _reason_kind(reason: str) -> str:
    """A failure reason without its study-specific tail, to count alike failures together."""
    return reason.split(":", 2)[0][:120] if reason else "(no reason given)"


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for the end of a run."""
    lines = [f"studies: {summary['studies']}  " + "  ".join(f"{k}: {v}" for k, v in summary["outcomes"].items()),
             f"cohort rows: {summary['cohort_rows']}  ({summary['files']['cohort.parquet']}, .csv)"]
    if summary["failed"]:
        lines.append(f"failed studies: {summary['failed']} (list: {summary['files']['failures.csv']})")
        lines += [f"  {n} x {reason}" for reason, n in summary["failure_reasons"].items()]
    return "\n".join(lines)
