"""Compare evaluation runs (ablations, folds) and optionally record them in a bundle's card.

Each ``--run NAME=PATH`` points at an ``evaluation.json`` written by
:mod:`training.evaluate`; the table has one row per run, case and variant (post-processed
or raw arg-max) with the mean over the evaluated labels, and per-label Dice columns.

Usage::

    python -m training.compare --title "Contrast augmentation vs none" \\
        --run contrast=output/evaluation/a/evaluation.json --run none=output/evaluation/b/evaluation.json \\
        --out output/evaluation/compare_augmentation.md [--into-bundle models/paraspinal_t2ax]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from paraspinal.model_bundle import TORCHSCRIPT_RELPATH, read_metadata
from training.model_card import metric_table


def comparison_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean rows (label -1) of every run/case/variant, named ``run · case · variant``."""
    rows = []
    for name, report in runs:
        for case in report["cases"]:
            for variant, key in (("post-processed", "rows"), ("raw", "raw_rows")):
                mean = dict(next(r for r in case[key] if r["label"] == -1))
                mean["name"] = f"{name} · {case['case']} · {variant}"
                rows.append(mean)
    return rows


def per_label_dice(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table: post-processed Dice per label (columns: every label any case scores) for every
    run and case; "-" where a case does not label it."""
    names: dict[int, str] = {}
    for _, report in runs:
        for case in report["cases"]:
            names.update({r["label"]: r["name"] for r in case["rows"] if r["label"] != -1})
    order = sorted(names)
    lines = ["| run · case | " + " | ".join(names[k] for k in order) + " |", "|---|" + "---|" * len(order)]
    for name, report in runs:
        for case in report["cases"]:
            dice = {r["label"]: r.get("dice") for r in case["rows"] if r["label"] != -1}
            cells = ["-" if k not in dice else "n/a" if dice[k] is None else f"{dice[k]:.3f}" for k in order]
            lines.append(f"| {name} · {case['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fold_mean_dice(runs: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, float]:
    """Per label (as text), the mean post-processed Dice over the held-out real subjects that label it, each
    subject's figure first averaged over the runs (seeds) tested on it, so a fold with more seeds does not
    outweigh the other (synthetic test phantoms are left out: the figure stands for real data)."""
    per_subject: dict[str, dict[str, list[float]]] = {}
    for _, report in runs:
        for case in report["cases"]:
            if str(case["case"]).startswith("synthetic"):
                continue
            for row in case["rows"]:
                if row["label"] > 0 and row.get("dice") is not None:
                    per_subject.setdefault(str(row["label"]), {}).setdefault(str(case["case"]), []).append(
                        float(row["dice"]))
    means = {}
    for label, subjects in sorted(per_subject.items(), key=lambda kv: int(kv[0])):
        subject_means = [sum(v) / len(v) for v in subjects.values()]
        means[label] = round(sum(subject_means) / len(subject_means), 4)
    return means


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--title", required=True)
    p.add_argument("--text", default="", help="one paragraph: what was compared, on which data")
    p.add_argument("--run", action="append", required=True, help="NAME=path/to/evaluation.json (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="markdown file to write")
    p.add_argument("--into-bundle", type=Path, default=None,
                   help="also store the table as a recipe check in this bundle's metadata and card")
    p.add_argument("--cross-validation", action="store_true",
                   help="the runs are leave-one-subject-out folds of the bundle's recipe: also store their "
                        "per-label Dice (mean over the folds that label it) as the bundle's held-out figure "
                        "(evaluation.cross_validation; shown beside every measurement)")
    p.add_argument("--cv-labels", type=int, nargs="+", default=None,
                   help="with --cross-validation: only these labels get a held-out figure (leave out labels whose "
                        "fold never had real training labels for them: that figure would describe another model)")
    args = p.parse_args(argv)
    runs = []
    for spec in args.run:
        name, _, path = spec.partition("=")
        runs.append((name, json.loads(Path(path).read_text())))
    rows = comparison_rows(runs)
    dice = per_label_dice(runs)
    text = args.text + ("\n\n" if args.text else "") + "Post-processed Dice per label:\n\n" + dice
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# {args.title}\n\n{text}\n\nMeans over the evaluated labels:\n\n{metric_table(rows)}\n")
    if args.into_bundle:
        from training.export import add_recipe_check, write_metadata

        metadata = read_metadata(args.into_bundle)
        evaluation = add_recipe_check(metadata, args.title, text + "\n\nMeans over the evaluated labels:", rows)
        if args.cross_validation:
            weights = args.into_bundle / TORCHSCRIPT_RELPATH
            evaluation["cross_validation"] = {
                "method": f"leave-one-subject-out folds of this recipe ({args.title})",
                # the recipe's figures stand for these weights, trained by it; other weights: none shown
                "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                "folds": [name for name, _ in runs],
                "per_label_dice": {label: dice for label, dice in fold_mean_dice(runs).items()
                                   if args.cv_labels is None or int(label) in args.cv_labels},
            }
        write_metadata(args.into_bundle, metadata)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
