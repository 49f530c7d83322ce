"""Ablation: an ensemble of models (e.g. the same recipe trained with other seeds) against one model,
with and without test-time mirroring, on a held-out case.

Each model runs the application's own inference (:func:`training.evaluate.predict_probabilities`);
an ensemble averages the models' softmax maps on the case's source grid, then the arg-max is
post-processed as the application does. Figures are post-processed Dice per label, their mean, and
the mean over multifidus and erector spinae (labels 1-4, the muscles both leave-one-subject-out
folds learn from real labels). The application runs one model; this measures whether more would
pay for their CPU time (network passes per slice are listed: mirroring doubles them).

Usage::

    python -m training.ensemble_ablation --case myosegmentum_tum01 \\
        --bundle seed0=output/long/bundles/ctx3k_foldA --bundle seed1=output/long/bundles/s1_foldA \\
        --out output/long/eval/ensemble_foldA.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from paraspinal.model_bundle import ModelBundle, load_bundle
from training.data import LoadedCase, real_cases
from training.evaluate import predict_probabilities, training_cases
from training.metrics import label_metrics
from training.postprocess import postprocess_labels

REAL_IN_BOTH_FOLDS = (1, 2, 3, 4)  # multifidus R/L, erector spinae R/L


def dice_scores(case: LoadedCase, probabilities: np.ndarray) -> dict[str, Any]:
    """Post-processed Dice per labelled muscle (by name), their mean and the multifidus/erector
    spinae mean, for softmax ``probabilities`` (C, I, J, K) on the case's source grid."""
    labels = [c for c in case.labelled_classes if c != 0]
    post = postprocess_labels(np.argmax(probabilities, axis=0).astype(np.uint8), case.spacing_mm)
    rows = label_metrics(post, case.label, labels, case.spacing_mm)
    both = [r["dice"] for r in rows if r["label"] in REAL_IN_BOTH_FOLDS]
    return {"mean": round(float(np.mean([r["dice"] for r in rows])), 4),
            "multifidus_erector_spinae_mean": round(float(np.mean(both)), 4) if both else None,
            "per_label": {r["name"]: round(float(r["dice"]), 4) for r in rows}}


def ensemble_ablation(case: LoadedCase, bundles: dict[str, ModelBundle]) -> list[dict[str, Any]]:
    """One row per variant: each model alone (one pass, mirrored) and the ensemble of all (one pass
    each, mirrored each), with the network passes per slice and the Dice of :func:`dice_scores`."""
    if case.label is None:
        raise ValueError(f"{case.case_id}: no reference labels to score against")
    probabilities: dict[tuple[str, bool], np.ndarray] = {}
    for name, bundle in bundles.items():
        for mirror in (False, True):
            probabilities[(name, mirror)], _ = predict_probabilities(
                case, dataclasses.replace(bundle, test_time_mirror=mirror))
    rows = []
    for mirror in (False, True):
        for name in bundles:
            rows.append({"variant": f"{name}, {'mirrored' if mirror else 'one pass'}", "models": [name],
                         "test_time_mirror": mirror, "passes_per_slice": 2 if mirror else 1,
                         **dice_scores(case, probabilities[(name, mirror)])})
        if len(bundles) > 1:
            mean = np.mean([probabilities[(name, mirror)] for name in bundles], axis=0)
            rows.append({"variant": f"ensemble of {len(bundles)}, {'mirrored' if mirror else 'one pass'} each",
                         "models": list(bundles), "test_time_mirror": mirror,
                         "passes_per_slice": len(bundles) * (2 if mirror else 1), **dice_scores(case, mean)})
    return rows


def markdown(case_id: str, rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"Held-out case {case_id}, post-processed Dice:", "",
             "| variant | passes per slice | mean | multifidus + erector spinae | per muscle |", "|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["per_label"].items())
        both = "" if r["multifidus_erector_spinae_mean"] is None else f"{r['multifidus_erector_spinae_mean']:.3f}"
        lines.append(f"| {r['variant']} | {r['passes_per_slice']} | {r['mean']:.3f} | {both} | {per} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ensemble_ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", required=True, help="a labelled real case id (e.g. myosegmentum_tum01)")
    p.add_argument("--bundle", action="append", required=True, help="NAME=PATH (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON (and .md beside it)")
    args = p.parse_args(argv)
    bundles = {}
    for spec in args.bundle:
        name, _, path = spec.partition("=")
        if not path:
            p.error(f"--bundle {spec}: expected NAME=PATH")
        bundles[name] = load_bundle(Path(path), "cpu")
    registry = real_cases()
    if args.case not in registry:
        print(f"error: unknown case {args.case!r}; known: {sorted(registry)}", file=sys.stderr)
        return 2
    for name, bundle in bundles.items():
        if args.case in training_cases(bundle):
            print(f"error: {args.case} is in {name}'s training data; held-out figures only", file=sys.stderr)
            return 2
    case = registry[args.case].load()
    rows = ensemble_ablation(case, bundles)
    text = markdown(case.case_id, rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"case": case.case_id, "bundles": {n: str(b.path) for n, b in bundles.items()},
                                        "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
