"""Quality control of each muscle's outline: an uncertainty score and plausibility checks,
combined into a "review recommended" flag with its reasons.

What a reader gets, per muscle and side in a stack (:class:`MuscleQuality`):

* ``uncertainty``, 0..1: the outline uncertainty of the model. With test-time mirroring (bundle
  0.3.0 on) it is the *mirror disagreement*: 1 - Dice between the prediction on the slice and the
  prediction on the slice mirrored left-right (labels swapped back), averaged over the slices that
  hold the muscle, weighted by their cross-sectional area. Without mirroring it is the mean
  normalised predictive entropy inside the mask. How well it ranks slices by their Dice against a
  reference is measured on held-out data (``python -m training.qc_validation``; model card);
* plausibility checks on the outlines themselves, independent of the model's confidence:
  left-right volume asymmetry, maximum cross-sectional area outside a wide adult range, a
  muscle split into separate pieces on a slice, a muscle missing on slices between slices that
  hold it, a muscle found on one side only, and a muscle that is always there (multifidus,
  erector spinae) found on neither side;
* ``review_recommended`` and ``reasons``: one plain sentence per check that fired.

The thresholds are configuration (:class:`QualitySettings`, ``quality:`` in config/default.yaml);
their defaults and how they were chosen are in the README ("Quality control").
Areas in mm², fractions in %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from paraspinal.settings import SettingsError

#: Plausible range of a muscle's largest cross-sectional area in a lumbar stack, mm² (one side,
#: adults). Deliberately wide: outside it an outline is much more likely wrong than the muscle
#: unusual. Published mean CSAs (L3-L5, per side): multifidus about 600-1000, erector spinae about
#: 1300-2500, psoas major about 800-2000, quadratus lumborum about 300-700 mm².
DEFAULT_MAX_CSA_RANGE_MM2: dict[str, tuple[float, float]] = {
    "multifidus": (150.0, 2200.0),
    "erector spinae": (400.0, 4500.0),
    "psoas major": (100.0, 3500.0),
    "quadratus lumborum": (50.0, 1600.0),
}


#: The checks, by key, with the short name the SR codes them by.
CHECKS: dict[str, str] = {
    "uncertainty": "Uncertain outline",
    "asymmetry": "Implausible left-right asymmetry",
    "csa": "Cross-sectional area outside plausible range",
    "fragments": "Outline in separate pieces",
    "gaps": "Missing between slices that hold it",
    "one_side": "Found on one side only",
    "absent": "Not found on either side",
}

#: Muscles beside every lumbar vertebra (L1-S1), so a lumbar axial stack always holds them.
DEFAULT_ALWAYS_PRESENT: tuple[str, ...] = ("multifidus", "erector spinae")


class QualityError(SettingsError):
    """A quality-control setting is out of range."""


@dataclass(frozen=True)
class QualitySettings:
    """Thresholds of the review flag (README "Quality control").

    Attributes:
        uncertainty_threshold: a muscle whose uncertainty (0..1) exceeds this is flagged.
        slice_uncertainty_threshold: slices above this are listed as uncertain (PDF key images).
        asymmetry_max_pct: left-right volume asymmetry index above this (%) is flagged.
        fragment_min_share: a second piece on a slice at least this share of the largest piece's
            area counts as a fragment.
        max_csa_range_mm2: muscle name -> (low, high) plausible largest CSA, mm².
        always_present: muscles every lumbar stack holds; found on neither side, they are
            flagged (a model that failed on a series finds nothing, which is not "absent").
    """

    uncertainty_threshold: float = 0.15
    slice_uncertainty_threshold: float = 0.25
    asymmetry_max_pct: float = 35.0
    fragment_min_share: float = 0.2
    max_csa_range_mm2: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: dict(DEFAULT_MAX_CSA_RANGE_MM2))
    always_present: tuple[str, ...] = DEFAULT_ALWAYS_PRESENT

    def __post_init__(self) -> None:
        for name in ("uncertainty_threshold", "slice_uncertainty_threshold", "fragment_min_share"):
            value = getattr(self, name)
            if not 0.0 < float(value) <= 1.0:
                raise QualityError(f"[quality] {name}: {value!r} must be within (0, 1]")
        if not float(self.asymmetry_max_pct) > 0.0:
            raise QualityError(f"[quality] asymmetry_max_pct: {self.asymmetry_max_pct!r} must be > 0")
        unknown = [m for m in self.always_present if m not in DEFAULT_MAX_CSA_RANGE_MM2]
        if unknown:
            raise QualityError(f"[quality] always_present: unknown muscle(s) {', '.join(map(repr, unknown))}; "
                               f"known: {', '.join(DEFAULT_MAX_CSA_RANGE_MM2)}")
        for muscle, bounds in self.max_csa_range_mm2.items():
            if len(bounds) != 2 or not 0.0 <= float(bounds[0]) < float(bounds[1]):
                raise QualityError(f"[quality] max_csa_range_mm2.{muscle}: {bounds!r} must be [low, high], "
                                   "0 <= low < high")


@dataclass
class MuscleQuality:
    """Quality of one muscle's outline in one stack (see the module docstring).

    Attributes:
        uncertainty: 0..1 (``None`` when the muscle is not found).
        uncertainty_kind: ``"mirror disagreement"`` or ``"predictive entropy"``.
        slice_uncertainty: per slice of the stack, ``None`` where the muscle is absent.
        uncertain_slices: 0-based slice indices above the slice threshold.
        review_recommended: True when any check fired.
        reasons: one sentence per check that fired.
        checks: the key of each check that fired (:data:`CHECKS`), in the order of ``reasons``.
    """

    uncertainty: float | None
    uncertainty_kind: str
    slice_uncertainty: list[float | None]
    uncertain_slices: list[int]
    review_recommended: bool
    reasons: list[str]
    checks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def summary(self) -> str:
        """One line for tables: "review recommended: ..." or "no review flag"."""
        return "review recommended: " + "; ".join(self.reasons) if self.review_recommended else "no review flag"


def slice_fragments(mask: np.ndarray, min_share: float) -> list[int]:
    """Slices (axis 0 of a (slice, row, col) mask) where the muscle is in several pieces: a second
    8-connected piece at least ``min_share`` of the largest piece's area."""
    out = []
    for k in range(mask.shape[0]):
        if not mask[k].any():
            continue
        components, n = ndimage.label(mask[k], structure=np.ones((3, 3), dtype=bool))
        if n < 2:
            continue
        sizes = np.sort(np.bincount(components.ravel())[1:])[::-1]
        if sizes[1] >= min_share * sizes[0]:
            out.append(k)
    return out


def missing_between(present: Sequence[bool]) -> list[int]:
    """Slices without the muscle between the first and the last slice that hold it."""
    idx = [k for k, p in enumerate(present) if p]
    if len(idx) < 2:
        return []
    return [k for k in range(idx[0], idx[-1] + 1) if not present[k]]


def weighted_uncertainty(slice_scores: Sequence[float | None], slice_csa_mm2: Sequence[float]) -> float | None:
    """CSA-weighted mean of the per-slice scores over the slices that hold the muscle."""
    pairs = [(s, a) for s, a in zip(slice_scores, slice_csa_mm2) if s is not None and a > 0]
    total = sum(a for _, a in pairs)
    if not pairs or total <= 0:
        return None
    return round(sum(s * a for s, a in pairs) / total, 4)


def _slices_text(slices: Sequence[int]) -> str:
    shown = ", ".join(str(k + 1) for k in slices[:6])
    return shown + (f" and {len(slices) - 6} more" if len(slices) > 6 else "")


def assess_muscle(*, muscle: str, side: str, found: bool, contralateral_found: bool | None,
                  labels_mask: np.ndarray, slice_csa_mm2: Sequence[float], max_csa_mm2: float,
                  asymmetry_index_pct: float | None, mirror_disagreement: Sequence[float | None],
                  entropy: Sequence[float | None], settings: QualitySettings) -> MuscleQuality:
    """Quality of one muscle and side in one stack.

    Args:
        labels_mask: (slice, row, col) bool mask of the muscle on the source grid.
        slice_csa_mm2: per-slice CSA, mm², in the stack's slice order.
        mirror_disagreement / entropy: per-slice scores from
            :class:`paraspinal.segmentation.SliceUncertainty` (``None`` where not computed).
        contralateral_found: whether the other side of the same muscle was found (``None``:
            the muscle has no other side in the label table).
    """
    use_mirror = any(v is not None for v in mirror_disagreement)
    kind = "mirror disagreement" if use_mirror else "predictive entropy"
    raw = list(mirror_disagreement if use_mirror else entropy)
    per_slice = [raw[k] if k < len(raw) and slice_csa_mm2[k] > 0 else None for k in range(len(slice_csa_mm2))]
    reasons: list[str] = []
    checks: list[str] = []

    def fired(check: str, reason: str) -> None:
        checks.append(check)
        reasons.append(reason)

    if not found:
        if contralateral_found:
            fired("one_side", f"not found on this side although the {muscle} of the other side was")
        elif muscle in settings.always_present:
            fired("absent", f"not found on either side, although every lumbar level holds the {muscle}: "
                            "the segmentation may have failed on this series")
        return MuscleQuality(None, kind, per_slice, [], bool(reasons), reasons, checks)
    score = weighted_uncertainty(per_slice, slice_csa_mm2)
    uncertain = [k for k, s in enumerate(per_slice) if s is not None and s > settings.slice_uncertainty_threshold]
    if score is not None and score > settings.uncertainty_threshold:
        fired("uncertainty", f"uncertain outline ({kind} {score:.2f} > {settings.uncertainty_threshold:.2f})")
    if asymmetry_index_pct is not None and asymmetry_index_pct > settings.asymmetry_max_pct:
        fired("asymmetry", f"left-right volume asymmetry {asymmetry_index_pct:.0f} % > {settings.asymmetry_max_pct:.0f} %")
    bounds = settings.max_csa_range_mm2.get(muscle)
    if bounds is not None and not bounds[0] <= max_csa_mm2 <= bounds[1]:
        fired("csa", f"largest cross-sectional area {max_csa_mm2:.0f} mm² outside the plausible "
                       f"{bounds[0]:.0f}-{bounds[1]:.0f} mm²")
    fragments = slice_fragments(labels_mask, settings.fragment_min_share)
    if fragments:
        fired("fragments", f"outline in separate pieces on slice(s) {_slices_text(fragments)}")
    gaps = missing_between([a > 0 for a in slice_csa_mm2])
    if gaps:
        fired("gaps", f"missing on slice(s) {_slices_text(gaps)} between slices that hold it")
    return MuscleQuality(score, kind, per_slice, uncertain, bool(reasons), reasons, checks)
