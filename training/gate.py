"""The gate: a fine-tuned candidate replaces the current model only when it measurably beats it.

Both bundles segment the same held-out site cases (patients that no training of the candidate
saw) with the application's own inference and post-processing
(:func:`training.evaluate.predict_probabilities`, :func:`training.postprocess.postprocess_labels`).
Per muscle label, Dice is averaged over the cases that annotate it (a partial correction
scores only the muscles it labels). The candidate is promoted only if

* the mean over labels of its Dice is higher than the current model's, and
* no label's Dice falls by more than ``max_drop`` (absolute Dice).

Without any held-out case that annotates a label there is nothing to measure, and the gate
refuses: no evidence, no promotion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from paraspinal.model_bundle import ModelBundle, load_bundle
from training.data import LoadedCase
from training.labels import label_name
from training.postprocess import postprocess_labels


@dataclass
class GateResult:
    """The comparison table and the decision.

    Attributes:
        rows: per label ``{"label", "name", "cases", "current", "candidate", "delta"}`` (Dice).
        mean: ``{"current", "candidate", "delta"}``: mean over the labels in ``rows``.
        decision: ``"promote"`` or ``"refuse"``.
        reasons: why (each failed criterion, or what passed).
        held_out_cases: ids of the evaluated cases.
        max_drop: the margin used.
    """

    rows: list[dict[str, Any]]
    mean: dict[str, float]
    decision: str
    reasons: list[str]
    held_out_cases: list[str]
    max_drop: float
    current_version: str = ""
    candidate_version: str = ""
    per_case: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table_markdown(self) -> str:
        lines = ["| label | held-out cases | current Dice | candidate Dice | change |", "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['name']} | {r['cases']} | {r['current']:.3f} | {r['candidate']:.3f} | "
                         f"{r['delta']:+.3f} |")
        if self.mean:
            lines.append(f"| **mean** | | {self.mean['current']:.3f} | {self.mean['candidate']:.3f} | "
                         f"{self.mean['delta']:+.3f} |")
        return "\n".join(lines)


def case_dice(case: LoadedCase, bundle: ModelBundle) -> dict[int, float]:
    """Post-processed Dice per label the case annotates (labels absent from both sides skipped)."""
    from training.evaluate import predict_probabilities  # matplotlib etc.: only when evaluating

    probs, _ = predict_probabilities(case, bundle)
    pred = postprocess_labels(np.argmax(probs, axis=0).astype(np.uint8), case.spacing_mm)
    out = {}
    for label in (c for c in case.labelled_classes if c != 0):
        ref, prd = case.label == label, pred == label
        total = int(ref.sum()) + int(prd.sum())
        if int(ref.sum()) == 0:
            continue  # annotated class absent from this case: nothing to score
        out[int(label)] = 2.0 * float((ref & prd).sum()) / float(total)
    return out


def decide(current: dict[int, list[float]], candidate: dict[int, list[float]], max_drop: float
           ) -> tuple[list[dict[str, Any]], dict[str, float], str, list[str]]:
    """Table, means and decision from per-label Dice lists (same cases, same order)."""
    rows = []
    for label in sorted(current):
        cur, cand = float(np.mean(current[label])), float(np.mean(candidate[label]))
        rows.append({"label": label, "name": label_name(label), "cases": len(current[label]),
                     "current": round(cur, 4), "candidate": round(cand, 4), "delta": round(cand - cur, 4)})
    if not rows:
        return rows, {}, "refuse", ["no held-out site case annotates any muscle: nothing to compare"]
    mean_cur = float(np.mean([r["current"] for r in rows]))
    mean_cand = float(np.mean([r["candidate"] for r in rows]))
    mean = {"current": round(mean_cur, 4), "candidate": round(mean_cand, 4), "delta": round(mean_cand - mean_cur, 4)}
    reasons = []
    if mean_cand <= mean_cur:
        reasons.append(f"mean Dice does not rise ({mean_cur:.3f} -> {mean_cand:.3f})")
    for r in rows:
        if r["delta"] < -max_drop:
            reasons.append(f"{r['name']} falls by {-r['delta']:.3f} (more than {max_drop:g})")
    if reasons:
        return rows, mean, "refuse", reasons
    return rows, mean, "promote", [f"mean Dice rises {mean_cur:.3f} -> {mean_cand:.3f}; no muscle falls by more "
                                   f"than {max_drop:g}"]


def compare(candidate: Path | ModelBundle, current: Path | ModelBundle, cases: Sequence[LoadedCase],
            max_drop: float) -> GateResult:
    """Run both models on ``cases`` (held out by patient) and decide."""
    cand = candidate if isinstance(candidate, ModelBundle) else load_bundle(Path(candidate), "cpu")
    cur = current if isinstance(current, ModelBundle) else load_bundle(Path(current), "cpu")
    scores_cur: dict[int, list[float]] = {}
    scores_cand: dict[int, list[float]] = {}
    per_case = []
    for case in cases:
        d_cur, d_cand = case_dice(case, cur), case_dice(case, cand)
        for label in d_cur:
            scores_cur.setdefault(label, []).append(d_cur[label])
            scores_cand.setdefault(label, []).append(d_cand[label])
        per_case.append({"case": case.case_id, "current": {str(k): round(v, 4) for k, v in d_cur.items()},
                         "candidate": {str(k): round(v, 4) for k, v in d_cand.items()}})
    rows, mean, decision, reasons = decide(scores_cur, scores_cand, max_drop)
    return GateResult(rows, mean, decision, reasons, [c.case_id for c in cases], max_drop,
                      current_version=cur.version, candidate_version=cand.version, per_case=per_case)
