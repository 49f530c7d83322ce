"""Muscle size and intramuscular fat, per muscle and side, for one stack.

Units and definitions (what the SR, measurements.json/csv and the PDF report carry):

* cross-sectional area (CSA) per slice, mm²: voxels of the muscle on the slice times the pixel
  area from PixelSpacing (0028,0030);
* fat CSA per slice, mm²: the sum of the voxels' fat shares (see :mod:`paraspinal.fat_methods`)
  times the pixel area; lean CSA = CSA - fat CSA;
* fat fraction per slice, %: fat CSA / CSA;
* volume, cm³: sum of the slice CSAs times the slice step (distance between slice centres
  along the normal, from ImagePositionPatient), so a gap between slices counts as muscle, as
  in the published method;
* volume-weighted fat fraction, %: fat shares summed over all the muscle's voxels of the stack
  over its voxel count (equivalently the slice fat fractions weighted by slice CSA);
* mean and maximum CSA, mm², over the slices that hold the muscle;
* left/right asymmetry index, %: |R - L| / ((R + L) / 2) x 100 of the two sides' volumes in
  the same stack (0 % symmetric), the same value on both sides; only when both sides are found
  (a side not found may be a segmentation failure rather than an absent muscle);
* simplified Goutallier grade (Baur et al.) from the volume-weighted fat fraction:
  < 10 % "normal/mild", 10-50 % "moderate", > 50 % "severe" (10 % and 50 % are moderate);
* PDFF, %: where the study has Dixon water and fat series on the same frame of reference,
  the mean (and the median) of the voxels' F / (W + F) inside the muscle mask eroded in-plane
  by ``pdff_erosion_voxels`` (see :func:`eroded_in_plane`; the edge of a mask reaches into the
  fat around the muscle, and quantitative MRI measures PDFF in an eroded region), with the
  voxel count kept, per slice and per stack, reported beside the T2 method's fat fraction
  (see :mod:`paraspinal.dixon`).

Slices are reported by position (``slice_z_mm``, LPS z of the slice centre, head +) and by
lumbar level only where :mod:`paraspinal.levels` determined it (from a SEG labelling the study's
vertebrae/discs on the same frame of reference; never guessed). Per determined level, over the
slices at that level that hold the muscle (:class:`LevelMeasure`):

* mean CSA, mm²: the mean of those slices' CSA;
* fat fraction, %: their fat CSA over their CSA (the slice fat fractions weighted by CSA);
* PDFF, %: where measured, the slice PDFFs weighted by the voxels each was measured in (slices
  without a PDFF left out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from paraspinal.fat_methods import FAT_METHODS, FatResult, n4_bias_correct, separate_fat
from paraspinal.fat_methods import fat_method as lookup_fat_method
from paraspinal.levels import SliceLevels, determine_levels, level_sort_key, spine_level
from paraspinal.model_bundle import LabelInfo
from paraspinal.quality import MuscleQuality, QualitySettings, assess_muscle
from paraspinal.stacks import StackVolume

if TYPE_CHECKING:  # the segmentation module pulls in torch and MONAI
    from paraspinal.segmentation import SliceUncertainty

__all__ = ["FAT_METHODS", "BIAS_CORRECTIONS", "GOUTALLIER_GRADES", "LevelMeasure", "MuscleMeasurement",
           "asymmetry_index", "eroded_in_plane", "goutallier_grade", "level_measures", "measure_stack", "pdff_in_mask"]

BIAS_CORRECTIONS = ("none", "n4")
#: Simplified Goutallier grades (Baur et al.), from the fat fraction in %.
GOUTALLIER_GRADES = ("normal/mild", "moderate", "severe")
GOUTALLIER_MODERATE_FROM_PCT = 10.0  # >= 10 % is moderate
GOUTALLIER_SEVERE_ABOVE_PCT = 50.0  # > 50 % is severe


def goutallier_grade(fat_fraction_pct: float | None) -> str | None:
    """Simplified Goutallier grade of a fat fraction in %: < 10 normal/mild, 10-50 moderate, > 50 severe."""
    if fat_fraction_pct is None:
        return None
    if fat_fraction_pct < GOUTALLIER_MODERATE_FROM_PCT:
        return GOUTALLIER_GRADES[0]
    if fat_fraction_pct <= GOUTALLIER_SEVERE_ABOVE_PCT:
        return GOUTALLIER_GRADES[1]
    return GOUTALLIER_GRADES[2]


def asymmetry_index(right: float | None, left: float | None) -> float | None:
    """|R - L| / ((R + L) / 2) x 100 (%); ``None`` when a side is unknown or both are zero."""
    if right is None or left is None or right < 0 or left < 0 or right + left == 0:
        return None
    return 100.0 * abs(right - left) / ((right + left) / 2.0)


@dataclass
class LevelMeasure:
    """Measures of one muscle and side over the slices at one lumbar level (``slices``: their
    0-based indices in the stack, only those holding the muscle). Areas in mm², fractions in %."""

    level: str  # "L4/L5" (disc) or "L4" (vertebral body)
    kind: str  # "disc" or "vertebra"
    slices: list[int]
    n_slices_with_muscle: int
    mean_csa_mm2: float
    fat_fraction_pct: float | None
    pdff_pct: float | None = None


@dataclass
class MuscleMeasurement:
    """Measures of one muscle on one side in one stack.

    Per-slice lists follow the stack's slice order (ascending along the slice normal);
    ``slice_z_mm`` is the LPS z (head +) of each slice's centre; ``slice_level`` the lumbar level
    where determined (else ``None``, see ``level_method``). Areas in mm², volume in cm³,
    fractions in %. Dixon PDFF (``pdff_pct`` mean, ``pdff_median_pct``, ``slice_pdff_pct`` per
    slice) is measured in the mask eroded in-plane by ``pdff_erosion_voxels`` voxels;
    ``pdff_voxels`` / ``slice_pdff_voxels`` count the voxels kept (with a known PDFF).
    """

    label: int
    muscle: str
    side: str
    stack_index: int
    found: bool
    n_voxels: int
    fat_method: str
    bias_correction: str = "none"
    slice_z_mm: list[float] = field(default_factory=list)
    slice_level: list[str | None] = field(default_factory=list)
    slice_csa_mm2: list[float] = field(default_factory=list)
    slice_fat_csa_mm2: list[float] = field(default_factory=list)
    slice_lean_csa_mm2: list[float] = field(default_factory=list)
    slice_fat_fraction_pct: list[float | None] = field(default_factory=list)
    slice_pdff_pct: list[float | None] = field(default_factory=list)
    volume_cm3: float = 0.0
    mean_csa_mm2: float = 0.0
    max_csa_mm2: float = 0.0
    fat_fraction_pct: float | None = None
    pdff_pct: float | None = None
    pdff_median_pct: float | None = None
    pdff_voxels: int = 0
    pdff_erosion_voxels: int = 0
    slice_pdff_voxels: list[int] = field(default_factory=list)
    asymmetry_index_pct: float | None = None
    goutallier_grade: str | None = None
    level_method: str = ""
    level_sources: list[dict] = field(default_factory=list)
    level_measures: list[LevelMeasure] = field(default_factory=list)
    pdff_source: dict | None = None
    fat_method_details: dict = field(default_factory=dict)
    quality: MuscleQuality | None = None

    @property
    def name(self) -> str:
        return f"{self.muscle} {self.side}"

    @property
    def present_slices(self) -> list[int]:
        """Indices of the slices that hold this muscle."""
        return [k for k, a in enumerate(self.slice_csa_mm2) if a > 0]

    def as_dict(self) -> dict:
        return asdict(self)


def _slice_centres_z(stack: StackVolume) -> list[float]:
    rows, cols = stack.pixels.shape[1:]
    centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0, 1.0])
    out = []
    for k in range(stack.n_slices):
        centre[2] = k
        out.append(round(float((stack.affine_lps @ centre)[2]), 2))
    return out


def _round_list(values, digits: int) -> list:
    return [None if v is None else round(float(v), digits) for v in values]


def _details(result: FatResult, label: int) -> dict:
    details: dict = {}
    if result.thresholds.get(label):
        details["slice_threshold"] = _round_list(result.thresholds[label], 2)
        details["slices_threshold_replaced"] = list(result.replaced.get(label, []))
    if result.lean_reference.get(label):
        details["slice_lean_reference"] = _round_list(result.lean_reference[label], 2)
        details["slice_fat_reference"] = _round_list(result.fat_reference, 2)
    if result.notes:
        details["notes"] = list(result.notes)
    return details


def measure_stack(stack: StackVolume, labels: np.ndarray, label_table: tuple[LabelInfo, ...],
                  fat_method: str = "otsu", min_voxels: int = 20, *, bias_correction: str = "none",
                  pdff: np.ndarray | None = None, pdff_source: dict | None = None,
                  levels: SliceLevels | None = None, uncertainty: SliceUncertainty | None = None,
                  quality: QualitySettings | None = None, pdff_erosion_voxels: int = 0) -> list[MuscleMeasurement]:
    """Measure every label of ``label_table`` in one stack.

    Args:
        stack: the source volume; intensities are taken from ``stack.pixels``.
        labels: (slice, row, col) label volume on the stack's grid.
        label_table: labels to report, from the model bundle.
        fat_method: key of :data:`paraspinal.fat_methods.FAT_METHODS`.
        min_voxels: below this many voxels a muscle is reported as not found.
        bias_correction: ``"none"`` or ``"n4"`` (N4 on the stack before fat separation).
        pdff: optional Dixon PDFF (0..1, NaN unknown) on the stack's grid.
        pdff_source: where ``pdff`` came from (series UIDs), carried into the results.
        levels: per-slice lumbar levels; default: unknown (reported by slice position).
        uncertainty: per-slice outline uncertainty from the segmentation, for the quality
            control (:mod:`paraspinal.quality`); without it the checks use the outlines only.
        quality: quality-control thresholds (defaults of :class:`QualitySettings` when omitted).
        pdff_erosion_voxels: the PDFF is measured in each muscle's mask eroded in-plane by this
            many voxels (0: the whole mask); see :func:`eroded_in_plane`.
    """
    if labels.shape != stack.pixels.shape:
        raise ValueError(f"label volume {labels.shape} does not match the stack {stack.pixels.shape}")
    lookup_fat_method(fat_method)  # fails early, naming the known methods
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(f"unknown bias correction {bias_correction!r}; known: {', '.join(BIAS_CORRECTIONS)}")
    if pdff is not None and pdff.shape != stack.pixels.shape:
        raise ValueError(f"PDFF volume {pdff.shape} does not match the stack {stack.pixels.shape}")
    levels = levels or determine_levels(stack.n_slices)
    if len(levels.levels) != stack.n_slices:
        raise ValueError(f"{len(levels.levels)} slice levels for a stack of {stack.n_slices} slices")
    z = _slice_centres_z(stack)
    area = stack.pixel_area_mm2
    counts = {info.value: int((labels == info.value).sum()) for info in label_table}
    found = tuple(info.value for info in label_table if counts[info.value] >= min_voxels)
    image = stack.pixels
    if found and bias_correction == "n4":
        image = n4_bias_correct(image, (stack.slice_step_mm or 1.0, *stack.pixel_spacing_mm))
    fat = (separate_fat(image, labels, found, fat_method, stack.pixel_spacing_mm) if found
           else FatResult(share=np.zeros(labels.shape, dtype=np.float32)))
    results = []
    for info in label_table:
        mask = labels == info.value
        n_voxels = counts[info.value]
        is_found = info.value in found
        result = MuscleMeasurement(info.value, info.muscle, info.side, stack.index, is_found, n_voxels,
                                   fat_method, bias_correction, slice_z_mm=z, slice_level=list(levels.levels),
                                   level_method=levels.method, level_sources=list(levels.sources),
                                   pdff_source=pdff_source if pdff is not None else None)
        per_slice_voxels = mask.sum(axis=(1, 2))
        per_slice_fat = np.where(mask, fat.share, 0.0).sum(axis=(1, 2)) if is_found else np.zeros(stack.n_slices)
        result.slice_csa_mm2 = [round(float(v) * area, 2) for v in per_slice_voxels]
        result.slice_fat_csa_mm2 = [round(float(f) * area, 2) for f in per_slice_fat]
        result.slice_lean_csa_mm2 = [round(float(v - f) * area, 2) for v, f in zip(per_slice_voxels, per_slice_fat)]
        result.slice_fat_fraction_pct = [
            round(100.0 * float(f) / float(v), 2) if v > 0 and is_found else None
            for v, f in zip(per_slice_voxels, per_slice_fat)
        ]
        result.slice_pdff_pct = [None] * stack.n_slices
        result.pdff_erosion_voxels = int(pdff_erosion_voxels)
        if is_found:
            present = per_slice_voxels > 0
            result.volume_cm3 = round(float(per_slice_voxels.sum()) * stack.voxel_volume_mm3 / 1000.0, 3)
            result.mean_csa_mm2 = round(float(per_slice_voxels[present].mean()) * area, 2)
            result.max_csa_mm2 = round(float(per_slice_voxels.max()) * area, 2)
            result.fat_fraction_pct = round(100.0 * float(per_slice_fat.sum()) / n_voxels, 2)
            result.goutallier_grade = goutallier_grade(result.fat_fraction_pct)
            result.fat_method_details = _details(fat, info.value)
            if pdff is not None:
                measured = pdff_in_mask(pdff, mask, pdff_erosion_voxels)
                result.slice_pdff_pct, result.slice_pdff_voxels = measured.slice_mean_pct, measured.slice_voxels
                result.pdff_pct, result.pdff_median_pct = measured.mean_pct, measured.median_pct
                result.pdff_voxels = measured.voxels
            result.level_measures = level_measures(result)
        results.append(result)
    _set_asymmetry(results)
    _set_quality(results, labels, uncertainty, quality or QualitySettings())
    return results


def _set_quality(results: list[MuscleMeasurement], labels: np.ndarray, uncertainty: SliceUncertainty | None,
                 settings: QualitySettings) -> None:
    """The review flag of every muscle (:func:`paraspinal.quality.assess_muscle`)."""
    by_key = {(m.muscle, m.side): m for m in results}
    for m in results:
        other = by_key.get((m.muscle, {"right": "left", "left": "right"}.get(m.side, "")))
        m.quality = assess_muscle(
            muscle=m.muscle, side=m.side, found=m.found, contralateral_found=None if other is None else other.found,
            labels_mask=labels == m.label, slice_csa_mm2=m.slice_csa_mm2, max_csa_mm2=m.max_csa_mm2,
            asymmetry_index_pct=m.asymmetry_index_pct,
            mirror_disagreement=uncertainty.mirror_disagreement.get(m.label, []) if uncertainty else [],
            entropy=uncertainty.entropy.get(m.label, []) if uncertainty else [], settings=settings)


def level_measures(m: MuscleMeasurement) -> list[LevelMeasure]:
    """Per determined level (head to feet), the muscle's measures over the slices at that level
    that hold it (definitions in the module docstring); levels where it is absent are left out."""
    by_level: dict[str, list[int]] = {}
    for k, level in enumerate(m.slice_level):
        if level and k < len(m.slice_csa_mm2) and m.slice_csa_mm2[k] > 0:
            by_level.setdefault(level, []).append(k)
    out = []
    for level in sorted(by_level, key=level_sort_key):
        ks = by_level[level]
        csa = np.array([m.slice_csa_mm2[k] for k in ks], dtype=np.float64)
        fat = np.array([m.slice_fat_csa_mm2[k] for k in ks], dtype=np.float64)
        # Slice PDFFs weighted by the voxels they were measured in (the eroded mask's), else by CSA.
        weights = m.slice_pdff_voxels if len(m.slice_pdff_voxels) == len(m.slice_csa_mm2) else m.slice_csa_mm2
        known = [(m.slice_pdff_pct[k], weights[k]) for k in ks
                 if k < len(m.slice_pdff_pct) and m.slice_pdff_pct[k] is not None]
        pdff = (round(sum(p * a for p, a in known) / sum(a for _, a in known), 2)
                if known and sum(a for _, a in known) > 0 else None)
        out.append(LevelMeasure(level=level, kind=spine_level(level).kind, slices=ks, n_slices_with_muscle=len(ks),
                                mean_csa_mm2=round(float(csa.mean()), 2),
                                fat_fraction_pct=round(100.0 * float(fat.sum() / csa.sum()), 2) if csa.sum() > 0
                                else None,
                                pdff_pct=pdff))
    return out


def eroded_in_plane(mask: np.ndarray, voxels: int) -> np.ndarray:
    """``mask`` (slice, row, col) eroded slice by slice: a voxel is kept when its in-plane
    Euclidean distance to the nearest voxel outside the mask on its slice exceeds ``voxels``
    (in voxel units; 0 keeps the mask). Depth 1 removes the voxels that share an edge with the
    outside (a 3x3 cross erosion); deeper erosions follow a disc, not a square. Never across
    slices: slices are thick (4-5 mm) and neighbouring slices hold the muscle elsewhere."""
    mask = np.asarray(mask, dtype=bool)
    if voxels <= 0:
        return mask.copy()
    from scipy.ndimage import distance_transform_edt

    out = np.zeros_like(mask)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        # Padding by one makes the image border count as outside the mask.
        distance = distance_transform_edt(np.pad(mask[k], 1))[1:-1, 1:-1]
        out[k] = distance > voxels
    return out


@dataclass
class PdffInMask:
    """PDFF inside one (eroded) mask: mean and median over the kept voxels with a known PDFF, %;
    per slice the mean, %, and the voxel count; ``None`` where less than MIN_COVERAGE of the
    kept voxels have a known PDFF or none were kept."""

    mean_pct: float | None
    median_pct: float | None
    voxels: int
    slice_mean_pct: list[float | None]
    slice_voxels: list[int]


def pdff_in_mask(pdff: np.ndarray, mask: np.ndarray, erosion_voxels: int = 0) -> PdffInMask:
    """PDFF (``pdff`` 0..1, NaN unknown, on the mask's grid) in ``mask`` eroded in-plane by
    ``erosion_voxels`` (:func:`eroded_in_plane`); see :class:`PdffInMask`."""
    from paraspinal.dixon import MIN_COVERAGE

    kept = eroded_in_plane(mask, erosion_voxels)
    per_slice, per_slice_voxels = [], []
    for k in range(kept.shape[0]):
        values = pdff[k][kept[k]]
        known = values[np.isfinite(values)]
        per_slice.append(round(100.0 * float(known.mean()), 2)
                         if values.size and known.size >= MIN_COVERAGE * values.size else None)
        per_slice_voxels.append(int(known.size))
    values = pdff[kept]
    known = values[np.isfinite(values)]
    enough = bool(values.size) and known.size >= MIN_COVERAGE * values.size
    return PdffInMask(mean_pct=round(100.0 * float(known.mean()), 2) if enough else None,
                      median_pct=round(100.0 * float(np.median(known)), 2) if enough else None,
                      voxels=int(known.size), slice_mean_pct=per_slice, slice_voxels=per_slice_voxels)


def _set_asymmetry(results: list[MuscleMeasurement]) -> None:
    """Volume asymmetry index of each muscle found on both sides (same value on both); none when a
    side is not found."""
    by_muscle: dict[str, dict[str, MuscleMeasurement]] = {}
    for m in results:
        by_muscle.setdefault(m.muscle, {})[m.side] = m
    for sides in by_muscle.values():
        right, left = sides.get("right"), sides.get("left")
        if right is None or left is None or not (right.found and left.found):
            continue  # a side not found may be a segmentation failure, not an absent muscle
        index = asymmetry_index(right.volume_cm3, left.volume_cm3)
        for m in (right, left):
            if m.found:
                m.asymmetry_index_pct = None if index is None else round(index, 2)
