"""Does the review flag work? How well the outline-uncertainty score ranks slices by their Dice.

Reads the per-slice records that ``python -m training.evaluate`` writes into evaluation.json
(held-out real cases and synthetic test cases; each record: one muscle on one axial slice where
the reference or the prediction holds it, with its Dice and its scores) and reports, per score:

* Spearman's rank correlation between the score and the slice Dice (negative is good: higher
  uncertainty, lower Dice);
* the AUC of the score for telling slices with Dice < 0.8 from the rest (0.5: no better than
  chance), computed as the Mann-Whitney U statistic over the two groups;
* at the configured slice threshold, the share of slices flagged and the share of bad slices
  among them (precision) and of bad slices caught (recall).

Slices the model misses entirely (reference only) have no score: they are counted and left out.

Usage::

    python -m training.qc_validation output/evaluation/foldA/evaluation.json \\
        output/evaluation/foldB/evaluation.json [--threshold 0.25] [--out qc.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

SCORES = ("mirror_disagreement", "entropy")
QC_TEXT = ("Each row: one muscle on one axial slice of a held-out case, where the reference or the prediction "
           "holds it. Spearman rho between the score and the slice Dice (negative: higher uncertainty, lower "
           "Dice); AUC of the score for slices with Dice < 0.8; share of slices above the slice threshold, and "
           "the precision and recall of that flag for Dice < 0.8. 'missed': slices the model did not predict at "
           "all (no score). The application reports the mirror disagreement (the other score: predictive "
           "entropy, for comparison).")
BAD_DICE = 0.8


def load_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Every per-slice record of every case in the evaluation.json files, tagged with its case."""
    records = []
    for path in paths:
        for case in json.loads(Path(path).read_text())["cases"]:
            for record in case.get("slices", []):
                records.append(dict(record, case=case["case"]))
    return records


def score_figures(records: list[dict[str, Any]], score: str, threshold: float) -> dict[str, Any]:
    """Spearman rho, AUC for Dice < 0.8, and the threshold's flag rate, precision and recall."""
    usable = [r for r in records if r.get(score) is not None]
    missed = sum(1 for r in records if r["pred_voxels"] == 0)
    out: dict[str, Any] = {"score": score, "slices": len(usable), "missed_slices": missed}
    if len(usable) < 3:
        return out
    values = np.array([r[score] for r in usable], dtype=np.float64)
    dice = np.array([r["dice"] for r in usable], dtype=np.float64)
    bad = dice < BAD_DICE
    rho, p = stats.spearmanr(values, dice)
    out.update(spearman_rho=round(float(rho), 3), spearman_p=float(f"{p:.2g}"), bad_slices=int(bad.sum()))
    if 0 < bad.sum() < len(bad):
        u = stats.mannwhitneyu(values[bad], values[~bad], alternative="two-sided").statistic
        out["auc_dice_below_0_8"] = round(float(u) / float(bad.sum() * (~bad).sum()), 3)
    flagged = values > threshold
    out.update(threshold=threshold, flagged_share=round(float(flagged.mean()), 3),
               precision=round(float(bad[flagged].mean()), 3) if flagged.any() else None,
               recall=round(float(flagged[bad].mean()), 3) if bad.any() else None)
    return out


def record_groups(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records pooled ('all'), split into real held-out and synthetic, and, where there are several real
    held-out cases, per real case: a pooled figure can be carried by one case's easy-to-rank failures while
    the score says little about the other's (0.7.0's fold A, card)."""
    groups: dict[str, list[dict[str, Any]]] = {"all": records}
    for r in records:
        groups.setdefault("synthetic" if r["case"].startswith("synthetic") else "real held-out", []).append(r)
    real_cases = sorted({r["case"] for r in records if not r["case"].startswith("synthetic")})
    if len(real_cases) > 1:
        for case in real_cases:
            groups[f"real held-out · {case}"] = [r for r in records if r["case"] == case]
    return groups


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"### {title}", "", "| data | score | slices (missed) | Spearman rho vs Dice | AUC (Dice < 0.8) | "
             "bad slices | flagged at threshold | precision | recall |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['data']} | {row['score']} | {row['slices']} ({row['missed_slices']}) | "
                     f"{row.get('spearman_rho', '-')} | {row.get('auc_dice_below_0_8', '-')} | "
                     f"{row.get('bad_slices', '-')} | {row.get('flagged_share', '-')} (> {row.get('threshold', '-')}) | "
                     f"{row.get('precision', '-')} | {row.get('recall', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.qc_validation", description=__doc__.split("\n\n")[0])
    p.add_argument("evaluations", nargs="+", type=Path, help="evaluation.json files of python -m training.evaluate")
    p.add_argument("--threshold", type=float, default=0.25, help="slice threshold (config quality.slice_...)")
    p.add_argument("--title", default="QC validation: outline uncertainty vs Dice per muscle and slice")
    p.add_argument("--out", type=Path, default=None, help="write the table (markdown) and the figures (.json)")
    p.add_argument("--into-bundle", type=Path, default=None,
                   help="also store the table as a section of this bundle's model card")
    args = p.parse_args(argv)
    records = load_records(args.evaluations)
    rows = [dict(score_figures(group, score, args.threshold), data=name)
            for name, group in record_groups(records).items() for score in SCORES]
    table = markdown(rows, args.title)
    print(table)
    if args.out:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    if args.into_bundle:
        from paraspinal.model_bundle import read_metadata
        from training.export import add_recipe_check, write_metadata

        metadata = read_metadata(args.into_bundle)
        add_recipe_check(metadata, args.title, QC_TEXT + "\n\n" + table.split("\n", 2)[2])
        write_metadata(args.into_bundle, metadata)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
