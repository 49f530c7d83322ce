"""Dixon (chemical-shift) water and fat series: find them in a study, put them on the T2 grid,
and measure the proton-density fat fraction PDFF = F / (W + F) inside the muscle masks.

Detection (per series, never from the description alone when ImageType speaks):

1. ImageType (0008,0008) values, upper case: ``WATER`` or ``W`` marks a water image, ``FAT`` or
   ``F`` a fat image (Siemens ``DERIVED\\PRIMARY\\DIXON\\WATER``, Philips mDIXON ``...\\W\\W...``,
   GE IDEAL/Flex ``...\\WATER``). Fraction maps (``FF``, ``FAT_FRACTION``, ``PDFF``) and in/opposed
   phase images are neither.
2. Only when ImageType says neither: the SeriesDescription vendor conventions, as tie-breakers --
   Siemens suffix ``_W`` / ``_F`` (``t1_vibe_dixon_tra_W``), GE prefix ``WATER:`` / ``FAT:``,
   Philips ``mDIXON W`` / ``mDIXON F`` and the words ``water`` / ``fat`` next to ``dixon``.

A water and a fat series form a pair when both are MR, share the T2 stack's
FrameOfReferenceUID (same patient position: their LPS coordinates are comparable) and have the
same slice geometry (orientation, matrix, spacing, slice positions) -- Dixon water and fat
images come from one acquisition. The series chosen as the T2 is never a Dixon candidate.
The node's series selector does not pick gradient-echo Dixon images as the T2: Siemens marks
them DERIVED (excluded) and their echo time is far below the T2 minimum. A T2-TSE Dixon water
image stored as ORIGINAL would pass its rules; :func:`dixon_kind` is what could exclude it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from paraspinal.dicom_index import SeriesRecord, StudyRecord
from paraspinal.stacks import StackError, StackVolume, load_stack, plan_stacks

WATER_IMAGE_TYPES = {"WATER", "W"}
FAT_IMAGE_TYPES = {"FAT", "F"}
#: ImageType values that mark something else than a plain water or fat image.
NOT_WATER_FAT_IMAGE_TYPES = {"FF", "FAT_FRACTION", "PDFF", "FATFRACTION", "IN_PHASE", "OUT_PHASE", "OPP_PHASE",
                             "IP", "OP", "R2STAR", "T2_STAR", "T2STAR"}
_WATER_DESCRIPTION = [re.compile(p, re.IGNORECASE) for p in
                      (r"(^|[_\s])w$", r"^water\s*:", r"mdixon.*\bw\b", r"dixon.*\bwater\b", r"\bwater\b.*dixon")]
_FAT_DESCRIPTION = [re.compile(p, re.IGNORECASE) for p in
                    (r"(^|[_\s])f$", r"^fat\s*:", r"mdixon.*\bf\b", r"dixon.*\bfat\b", r"\bfat\b.*dixon")]
#: PDFF is computed where W + F exceeds this fraction of the 99th percentile of W + F (background noise
#: has no meaningful fraction).
SIGNAL_FLOOR = 0.05
#: A muscle section's PDFF is reported when at least this share of its voxels has a valid PDFF.
MIN_COVERAGE = 0.5


def dixon_kind(series: SeriesRecord) -> tuple[str | None, str]:
    """("water" | "fat" | None, why) for one series."""
    first = series.first
    image_type = {str(v).strip().upper() for v in (first.get("ImageType") or [])}
    if image_type & NOT_WATER_FAT_IMAGE_TYPES:
        return None, f"ImageType {'/'.join(sorted(image_type & NOT_WATER_FAT_IMAGE_TYPES))} is not a water/fat image"
    water, fat = bool(image_type & WATER_IMAGE_TYPES), bool(image_type & FAT_IMAGE_TYPES)
    if water and not fat:
        return "water", "ImageType " + "/".join(sorted(image_type & WATER_IMAGE_TYPES))
    if fat and not water:
        return "fat", "ImageType " + "/".join(sorted(image_type & FAT_IMAGE_TYPES))
    if water and fat:
        return None, "ImageType names both water and fat"
    description = str(first.get("SeriesDescription", "") or "").strip()
    is_water = any(p.search(description) for p in _WATER_DESCRIPTION)
    is_fat = any(p.search(description) for p in _FAT_DESCRIPTION)
    if is_water != is_fat:
        kind = "water" if is_water else "fat"
        return kind, f"SeriesDescription '{description}' (vendor {kind} naming; ImageType silent)"
    return None, "not a Dixon water or fat series"


def _image_type_groups(study: StudyRecord) -> list[SeriesRecord]:
    """The study's series, each split by ImageType: Philips may store water, fat, in- and
    opposed-phase images of one mDIXON acquisition in ONE series, told apart only per instance."""
    out = []
    for series in study.series.values():
        groups: dict[tuple[str, ...], list] = {}
        for record in series.instances:
            key = tuple(str(v).strip().upper() for v in (record.header.get("ImageType") or []))
            groups.setdefault(key, []).append(record)
        if len(groups) == 1:
            out.append(series)
        else:
            out.extend(SeriesRecord(series.series_uid, instances) for instances in groups.values())
    return out


def _geometry_key(series: SeriesRecord) -> tuple:
    keys = []
    for record in series.instances:
        h = record.header
        try:
            keys.append((tuple(round(float(v), 3) for v in h.ImagePositionPatient),
                         tuple(round(float(v), 4) for v in h.ImageOrientationPatient),
                         tuple(round(float(v), 4) for v in h.PixelSpacing), int(h.Rows), int(h.Columns)))
        except (AttributeError, TypeError, ValueError):
            return ()
    return tuple(sorted(keys))


@dataclass
class DixonPair:
    """The water and fat series used for PDFF, and why they were taken."""

    water: SeriesRecord
    fat: SeriesRecord
    reason: str

    def as_dict(self) -> dict:
        return {"water_series_instance_uid": self.water.series_uid, "fat_series_instance_uid": self.fat.series_uid,
                "water_series_description": self.water.description, "fat_series_description": self.fat.description,
                "reason": self.reason}


def find_dixon_pair(study: StudyRecord, frame_of_reference_uid: str,
                    exclude_series: set[str] | frozenset[str] = frozenset()) -> tuple[DixonPair | None, str]:
    """The Dixon water/fat pair on ``frame_of_reference_uid``, or ``None`` and the reason."""
    waters, fats = [], []
    for series in _image_type_groups(study):
        if series.series_uid in exclude_series or str(series.first.get("Modality", "")) != "MR":
            continue
        kind, why = dixon_kind(series)
        if kind is None:
            continue
        if str(series.first.get("FrameOfReferenceUID", "")) != str(frame_of_reference_uid):
            continue
        (waters if kind == "water" else fats).append((series, why))
    if not waters or not fats:
        found = "water" if waters else "fat" if fats else "no"
        return None, f"no Dixon water+fat pair on the T2's frame of reference ({found} series found)"
    for water, why_w in waters:
        key = _geometry_key(water)
        for fat, why_f in fats:
            if key and key == _geometry_key(fat):
                return DixonPair(water, fat, f"water: {why_w}; fat: {why_f}; same geometry and frame of reference"), ""
    return None, "Dixon water and fat series found, but no water/fat pair shares one slice geometry"


def load_series_stacks(series: SeriesRecord, orientation_tolerance_deg: float = 1.0) -> list[StackVolume]:
    """Every stack of a series as a volume (modality LUT applied)."""
    plans = plan_stacks(series, orientation_tolerance_deg)
    return [load_stack(plan, series.series_uid, i) for i, plan in enumerate(plans, start=1)]


def _sitk_image(volume: np.ndarray, affine_lps: np.ndarray):
    """A SimpleITK image (LPS physical space, as ITK) of a (slice, row, col) volume with its affine."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
    columns = np.asarray(affine_lps, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in np.asarray(affine_lps)[:3, 3]))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def resample_to_stack(volume: np.ndarray, affine_lps: np.ndarray, target: StackVolume) -> np.ndarray:
    """``volume`` (with its affine) linearly resampled onto ``target``'s grid; NaN outside its field of view.

    Both affines map (col, row, slice) to LPS, so SimpleITK's physical space is the patient's.
    On an identical grid this is the identity.
    """
    import SimpleITK as sitk

    source = _sitk_image(volume, affine_lps)
    reference = _sitk_image(np.zeros(target.pixels.shape, dtype=np.float32), target.affine_lps)
    out = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def pdff_from_water_fat(water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """F / (W + F) per voxel in [0, 1]; NaN where W + F is below the noise floor or unknown."""
    water = np.asarray(water, dtype=np.float64)
    fat = np.asarray(fat, dtype=np.float64)
    total = water + fat
    finite = np.isfinite(total)
    if not finite.any():
        return np.full(total.shape, np.nan, dtype=np.float32)
    floor = SIGNAL_FLOOR * float(np.percentile(total[finite], 99))
    with np.errstate(invalid="ignore", divide="ignore"):
        pdff = np.where(finite & (total > floor), fat / np.where(total > 0, total, 1.0), np.nan)
    return np.clip(pdff, 0.0, 1.0).astype(np.float32)


def pdff_on_stack(pair: DixonPair, target: StackVolume) -> np.ndarray:
    """PDFF (0..1, NaN where unknown) on ``target``'s grid from the pair's water and fat series.

    Water and fat are resampled separately and the fraction taken on the T2 grid, so a T2 voxel
    gets the fat share of the signal it covers. Several Dixon stacks fill the grid in turn.
    """
    water_stacks = load_series_stacks(pair.water)
    fat_stacks = load_series_stacks(pair.fat)
    if len(water_stacks) != len(fat_stacks):
        raise StackError("Dixon water and fat series have different stack layouts")
    out = np.full(target.pixels.shape, np.nan, dtype=np.float32)
    for w, f in zip(water_stacks, fat_stacks):
        water = resample_to_stack(w.pixels, w.affine_lps, target)
        fat = resample_to_stack(f.pixels, f.affine_lps, target)
        pdff = pdff_from_water_fat(water, fat)
        fill = np.isnan(out) & np.isfinite(pdff)
        out[fill] = pdff[fill]
    return out
