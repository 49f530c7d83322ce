"""Choose the lumbar axial T2 series of a study.

Plane comes from ImageOrientationPatient, weighting from EchoTime/RepetitionTime; the
SeriesDescription is only a tie-breaker between series that pass every rule. Every series
gets a :class:`SeriesDecision` with the reason it was or was not chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from paraspinal.settings import SelectionRules
from paraspinal.dicom_index import SeriesRecord, StudyRecord
from paraspinal.dixon import dixon_kind
from paraspinal.enhanced_mr import MR_IMAGE_SOP_CLASSES, explain
from paraspinal.stacks import StackError, StackPlan, plan_stacks, slice_geometry


NO_SERIES_REASON = "no lumbar axial T2 series"


@dataclass
class SeriesDecision:
    """Why a series was (not) chosen. ``stacks`` is set for candidates that passed every rule."""

    series_uid: str
    series_number: str
    description: str
    n_instances: int
    accepted: bool
    reason: str
    tie_break_score: int = 0
    stacks: list[StackPlan] | None = None

    def as_dict(self) -> dict:
        return {
            "series_instance_uid": self.series_uid,
            "series_number": self.series_number,
            "series_description": self.description,
            "instances": self.n_instances,
            "chosen": self.accepted,
            "reason": self.reason,
        }


@dataclass
class StudySelection:
    chosen: SeriesDecision | None
    decisions: list[SeriesDecision]
    reason: str  # why the study has (no) analysable series


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().lower()


def excluded_body_part(study: StudyRecord, rules: SelectionRules) -> str | None:
    """The first body-part word that rules the study out, looking at body part and descriptions."""
    for series in study.series.values():
        for keyword in ("BodyPartExamined", "StudyDescription"):
            text = _text(series.first, keyword)
            for word in rules.excluded_body_parts:
                if word and word in text:
                    return f"{keyword} '{series.first.get(keyword)}' is not lumbar"
    return None


def _tie_break(description: str, rules: SelectionRules) -> int:
    text = description.lower()
    return sum(w in text for w in rules.preferred_description_words) - sum(
        w in text for w in rules.avoided_description_words)


def _float(ds: Dataset, keyword: str) -> float | None:
    """A single finite number, or None (missing, not a number, NaN or infinite)."""
    try:
        value = ds.get(keyword)
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _values(ds: Dataset, keyword: str) -> list[str]:
    """A CS attribute's values, upper case, stripped (a single value as a list of one)."""
    value = ds.get(keyword)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)  # pydicom MultiValue for several
    return [str(v).strip().upper() for v in items if str(v).strip()]


def fat_suppression(header: Dataset) -> str | None:
    """Why the header says fat is suppressed or the contrast is inversion-prepared, or None.

    Judged from acquisition attributes, never the description: ScanOptions FS (the defined term
    for fat saturation, PS3.3 C.8.3.1), SpectrallySelectedSuppression FAT / FAT_AND_WATER
    (Enhanced MR, MR Modifier macro), ScanningSequence IR or InversionRecovery YES (STIR and SPAIR
    null fat; FLAIR nulls fluid: neither is the plain T2 the model and the fat measurement expect).
    """
    if "FS" in _values(header, "ScanOptions"):
        return "ScanOptions FS (fat saturation)"
    suppression = _values(header, "SpectrallySelectedSuppression")
    if any(v in ("FAT", "FAT_AND_WATER") for v in suppression):
        return f"SpectrallySelectedSuppression {'/'.join(suppression)}"
    ti = _float(header, "InversionTime")
    ti_text = f", InversionTime {ti:g} ms" if ti is not None else ""
    if "IR" in _values(header, "ScanningSequence"):
        return f"inversion recovery (ScanningSequence {'/'.join(_values(header, 'ScanningSequence'))}{ti_text})"
    if "YES" in _values(header, "InversionRecovery"):
        return f"inversion recovery (InversionRecovery YES{ti_text})"
    return None


def _name(series: SeriesRecord) -> str:
    """How a reason names a series: by its number (what a person sees in the viewer)."""
    return f"series {series.series_number or series.series_uid}"


def _explained(series: SeriesRecord, exc: Exception) -> str:
    """The problem, naming the functional group an attribute belongs in where the series is multi-frame."""
    multi_frame = any(r.frame_number is not None for r in series.instances)
    return explain(str(exc)) if multi_frame else str(exc)


def judge_series(series: SeriesRecord, rules: SelectionRules) -> SeriesDecision:
    """Apply the selection rules to one series."""
    first = series.first

    def reject(reason: str) -> SeriesDecision:
        return SeriesDecision(series.series_uid, series.series_number, series.description,
                              len(series.instances), False, reason)

    sop_classes = {r.sop_class_uid for r in series.instances}
    if not sop_classes <= MR_IMAGE_SOP_CLASSES:
        names = ", ".join(sorted(UID(s).name for s in sop_classes))
        return reject(f"not an MR image series (SOP class {names})")
    broken = next((r for r in series.instances if r.problem), None)
    if broken is not None:
        return reject(f"{_name(series)}: {broken.name}: {broken.problem}")
    if str(first.get("Modality", "")) != "MR":
        return reject(f"modality {first.get('Modality', 'missing')} is not MR")
    image_type = {str(v).upper() for v in (first.get("ImageType") or [])}
    excluded = sorted(image_type & {t.upper() for t in rules.excluded_image_types})
    if excluded:
        return reject(f"ImageType contains {'/'.join(excluded)}")
    kind, why = dixon_kind(series)
    if kind is not None and why.startswith("ImageType"):
        # Only ImageType decides: a description alone never rules a series out.
        return reject(f"Dixon {kind} image ({why}); used as the fat reference, not as the T2")
    try:
        geometry = slice_geometry(first)
    except StackError as exc:
        return reject(f"{_name(series)}: {series.instances[0].name}: {_explained(series, exc)} (unusable geometry)")
    angle = float(np.degrees(np.arccos(min(1.0, abs(float(geometry.normal[2]))))))
    if angle > rules.axial_max_angle_deg:
        plane = "sagittal" if abs(geometry.normal[0]) > abs(geometry.normal[1]) else "coronal"
        return reject(f"not axial: {plane} plane (slice normal {angle:.0f} deg from the patient z axis, "
                      f"limit {rules.axial_max_angle_deg:.0f})")
    te, tr = _float(first, "EchoTime"), _float(first, "RepetitionTime")
    if te is None or tr is None:
        missing = "EchoTime" if te is None else "RepetitionTime"
        return reject(_explained(series, ValueError(f"{missing} missing or not a finite number: weighting cannot be "
                                                    "determined")))
    if te < rules.min_echo_time_ms or tr < rules.min_repetition_time_ms:
        return reject(f"not T2-weighted: TE {te:g} ms, TR {tr:g} ms (need TE >= {rules.min_echo_time_ms:g}, "
                      f"TR >= {rules.min_repetition_time_ms:g})")
    suppressed = fat_suppression(first) if rules.exclude_fat_suppressed else None
    if suppressed:
        return reject(f"fat-suppressed or inversion-prepared: {suppressed}; fat cannot be measured on it and the "
                      "model was trained on T2 without fat suppression")
    try:
        plans = plan_stacks(series, rules.stack_orientation_tolerance_deg)
    except StackError as exc:
        return reject(f"{_name(series)}: {_explained(series, exc)} (unusable geometry)")
    kept = [p for p in plans if len(p.instances) >= rules.min_slices_per_stack]
    for number, plan in enumerate(kept, start=1):
        # A SEG derives from the frames of ONE multi-frame instance (or from single-frame images).
        multi = {r.sop_instance_uid for r in plan.instances if r.frame_number is not None}
        if multi and (len(multi) > 1 or any(r.frame_number is None for r in plan.instances)):
            return reject(f"stack {number} takes its slices from {len(multi)} multi-frame instance(s)"
                          f"{' and single-frame images' if any(r.frame_number is None for r in plan.instances) else ''}"
                          ": a SEG can reference the frames of one multi-frame instance only (not supported)")
    if not kept:
        longest = max(len(p.instances) for p in plans)
        return reject(f"too few slices: longest stack has {longest}, need at least {rules.min_slices_per_stack}")
    stacks_text = f"{len(kept)} stack(s) of {', '.join(str(len(p.instances)) for p in kept)} slices"
    if len(kept) < len(plans):
        stacks_text += f"; {len(plans) - len(kept)} stack(s) below {rules.min_slices_per_stack} slices dropped"
    decision = SeriesDecision(series.series_uid, series.series_number, series.description,
                              len(series.instances), True,
                              f"axial T2 (TE {te:g} ms, TR {tr:g} ms, {angle:.0f} deg from axial), {stacks_text}",
                              tie_break_score=_tie_break(series.description, rules), stacks=kept)
    return decision


def _judge_safely(series: SeriesRecord, rules: SelectionRules) -> SeriesDecision:
    """:func:`judge_series`, with anything unforeseen in one series' header (an odd value that
    raises) becoming that series' rejection, so the other series can still be chosen."""
    try:
        return judge_series(series, rules)
    except Exception as exc:
        return SeriesDecision(series.series_uid, series.series_number, series.description, len(series.instances),
                              False, f"{_name(series)}: header cannot be judged ({type(exc).__name__}: {exc})")


def select_series(study: StudyRecord, rules: SelectionRules) -> StudySelection:
    """Pick one lumbar axial T2 series; every other series gets its reason."""
    decisions = [_judge_safely(s, rules) for s in study.series.values()]
    body = excluded_body_part(study, rules)
    if body:
        for d in decisions:
            if d.accepted:
                d.accepted, d.reason, d.stacks = False, f"study excluded: {body}", None
        return StudySelection(None, decisions, f"{NO_SERIES_REASON}: {body}")
    candidates = [d for d in decisions if d.accepted]
    if not candidates:
        return StudySelection(None, decisions, f"{NO_SERIES_REASON} among {len(decisions)} series")
    candidates.sort(key=lambda d: (d.tie_break_score, sum(len(p.instances) for p in d.stacks or [])), reverse=True)
    chosen = candidates[0]
    for other in candidates[1:]:
        other.accepted = False
        other.stacks = None
        other.reason = f"also axial T2, but ranked below {chosen.series_number or chosen.series_uid} " \
                       f"(description tie-break {other.tie_break_score} vs {chosen.tie_break_score}, then slice count)"
    chosen.reason = "chosen: " + chosen.reason
    return StudySelection(chosen, decisions, chosen.reason)
