"""Lumbar level of each slice, taken from a labelled source in the same study, or an honest "unknown".

A level is reported only where it is determined from the study itself; it is never guessed from
slice order, slice count or field-of-view position, because a wrong level silently corrupts every
per-level comparison. The node has no disc or vertebra detector of its own. What it does use is a
**labelled source**: a DICOM Segmentation (SEG) in the same study whose segments are lumbar
vertebrae and/or intervertebral discs identified by SNOMED CT codes (as written by TotalSegmentator,
a MONAI spine model or a radiologist in 3D Slicer / OHIF), on the **same FrameOfReferenceUID** as
the analysed axial stack (any orientation: usually the sagittal T2). The SEG's voxels are placed in
patient space (LPS mm) with highdicom, and each axial slice is compared with them:

* the slice plane (its centre and normal, from the stack's geometry) and the muscles' region in it
  (the in-plane bounding box of every muscle label of the stack, 10 mm margin; the whole field of
  view when there are no labels);
* a labelled structure *meets* the slice when one of its voxels in that region lies within
  ``max(half the slice thickness, half the voxel's extent along the normal)`` of the plane (the
  plane passes through the voxel, or the voxel is nearest the slice centre within half the slice
  thickness);
* the slice takes the **disc** it meets ("L4/L5"), else the **vertebral body** it meets ("L4"),
  else no level (``None``). Where several discs (or vertebrae) meet the slice, the one the plane
  cuts over the largest area wins (then the nearest). Nothing is interpolated beyond or between
  the labelled structures: a slice between two labelled discs whose vertebra is not labelled has
  no level;
* the labelled structures must lie in anatomical order from head to feet (the centroid of L3 above
  that of L3/L4 above L4 ...); a source that contradicts it is not used (a mislabelled source).

SEG objects that are on another frame of reference, that hold no vertebra or disc segment (e.g.
this node's own muscle SEG), or that cannot be read are ignored, and :attr:`SliceLevels.method`
says which and why. Several usable SEGs are pooled (the same level in two SEGs is the union of
their voxels; the order check guards against contradictions).

Codes (each with its source; a segment is recognised by its SegmentedPropertyType code, or by a
generic property type "Vertebra" / "Vertebral body" / "... disc" with the level in its
AnatomicRegionSequence or property type modifier; the segment label text, e.g. "L4",
"vertebrae_L4", "L4/L5", "L4-5 disc", is only a fallback for a segment that carries no such code):

* vertebrae T12, L1-L5: SCT codes of DICOM CID 7603 "Vertebra" (with the legacy SRT codes);
* S1 vertebra: SCT 65985001 (TotalSegmentator's published SNOMED mapping; not in a DICOM CID);
* discs T12/L1 .. L5/S1: SCT codes of DICOM CID 7604 "Intervertebral Disc" (with the legacy SRT
  codes), and SCT 75782005 "Intervertebral disc structure of fifth lumbar vertebra" for L5/S1;
* in the SR, a disc level is the finding site "Level of L4/L5 intervertebral disc" (DICOM CID 1003
  "Spinal landmarks"), a vertebral level the vertebra's code (CID 7603 / S1 as above).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

POSITION_NOTE = "measurements are reported by slice position (LPS z of the slice centre, head +)"
LEVEL_UNKNOWN_REASON = ("level unknown: the study holds no DICOM SEG labelling lumbar vertebrae or intervertebral "
                        f"discs on this series' frame of reference; {POSITION_NOTE}")

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_SOP_CLASSES = (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE)

#: In-plane margin (mm) around the muscles' bounding box within which a structure must lie.
REGION_MARGIN_MM = 10.0


@dataclass(frozen=True)
class SpineLevel:
    """One vertebra or intervertebral disc: its name, kind and codes."""

    name: str  # "L4" or "L4/L5"
    kind: str  # "vertebra" or "disc"
    code: str  # SCT code of the structure
    meaning: str
    aliases: tuple[tuple[str, str], ...] = ()  # other (scheme, code) pairs naming the same structure
    level_code: tuple[str, str] | None = None  # SCT "Level of ... intervertebral disc" (CID 1003), discs only

    def site_code(self) -> tuple[str, str, str]:
        """(code value, scheme, meaning) naming this level as a finding site in the SR."""
        if self.level_code is not None:
            return self.level_code[0], "SCT", self.level_code[1]
        return self.code, "SCT", self.meaning


#: Head to feet. Sources: see the module docstring.
SPINE_LEVELS: tuple[SpineLevel, ...] = (
    SpineLevel("T12", "vertebra", "23215003", "T12 vertebra", (("SRT", "T-117C0"),)),
    SpineLevel("T12/L1", "disc", "76206002", "T12/L1 disc", (("SRT", "T-117CB"),),
               ("243926009", "Level of T12/L1 intervertebral disc")),
    SpineLevel("L1", "vertebra", "66794005", "L1 vertebra", (("SRT", "T-11910"),)),
    SpineLevel("L1/L2", "disc", "80064006", "L1/L2 disc", (("SRT", "T-1191B"),),
               ("243920003", "Level of L1/L2 intervertebral disc")),
    SpineLevel("L2", "vertebra", "14293000", "L2 vertebra", (("SRT", "T-11920"),)),
    SpineLevel("L2/L3", "disc", "67459009", "L2/L3 disc", (("SRT", "T-1192B"),),
               ("243921004", "Level of L2/L3 intervertebral disc")),
    SpineLevel("L3", "vertebra", "36470004", "L3 vertebra", (("SRT", "T-11930"),)),
    SpineLevel("L3/L4", "disc", "62551000", "L3/L4 disc", (("SRT", "T-1193B"),),
               ("243922006", "Level of L3/L4 intervertebral disc")),
    SpineLevel("L4", "vertebra", "11994002", "L4 vertebra", (("SRT", "T-11940"),)),
    SpineLevel("L4/L5", "disc", "84020006", "L4/L5 disc", (("SRT", "T-1194B"),),
               ("243923001", "Level of L4/L5 intervertebral disc")),
    SpineLevel("L5", "vertebra", "49668003", "L5 vertebra", (("SRT", "T-11950"),)),
    SpineLevel("L5/S1", "disc", "715056000", "L5/S1 disc", (("SRT", "T-D08DC"), ("SCT", "75782005")),
               ("243927000", "Level of L5/S1 intervertebral disc")),
    SpineLevel("S1", "vertebra", "65985001", "S1 vertebra"),
)
LEVEL_ORDER = {level.name: i for i, level in enumerate(SPINE_LEVELS)}
_BY_NAME = {level.name: level for level in SPINE_LEVELS}
_BY_CODE = {("SCT", level.code): level for level in SPINE_LEVELS}
_BY_CODE.update({alias: level for level in SPINE_LEVELS for alias in level.aliases})
#: Generic property types under which the level is given as anatomic region / modifier.
_GENERIC_VERTEBRA = {("SCT", "51282000"), ("SCT", "3572006"), ("SRT", "T-11500"), ("SRT", "T-11502")}


def spine_level(name: str) -> SpineLevel:
    """The :class:`SpineLevel` named ``name`` ("L4", "L4/L5"); ``KeyError`` when unknown."""
    return _BY_NAME[name]


def level_sort_key(name: str) -> int:
    """Head-to-feet order of a level name."""
    return LEVEL_ORDER.get(name, len(LEVEL_ORDER))


@dataclass
class SliceLevels:
    """Per-slice level labels of one stack; ``None`` where the level is unknown."""

    levels: list[str | None] = field(default_factory=list)
    determined: bool = False
    method: str = LEVEL_UNKNOWN_REASON
    sources: list[dict] = field(default_factory=list)  # the SEG(s) the levels come from

    def as_dict(self) -> dict:
        return {"levels": self.levels, "determined": self.determined, "method": self.method,
                "sources": self.sources}


def determine_levels(n_slices: int, reason: str = LEVEL_UNKNOWN_REASON) -> SliceLevels:
    """All levels of a stack unknown, with the reason (the default when no labelled source is used)."""
    return SliceLevels(levels=[None] * int(n_slices), determined=False, method=reason)


# --- recognising level segments ---------------------------------------------------------------

def _code_of(item) -> tuple[str, str] | None:
    try:
        return str(item.CodingSchemeDesignator).strip(), str(item.CodeValue).strip()
    except AttributeError:
        return None


_TEXT_VERTEBRA = re.compile(r"^(?:vertebra[e]?\s*)?(t12|l[1-5]|s1)(?:\s*(?:vertebra[e]?|vertebral body|body))?$")
_TEXT_DISC = re.compile(r"^(?:(?:intervertebral\s*)?dis[ck]\s*)?(t12|l[1-5])\s*(?:/|-|\s)\s*(l?[1-5]|s1)"
                        r"(?:\s*(?:intervertebral\s*)?dis[ck])?$")


def level_from_text(text: str) -> SpineLevel | None:
    """The level a segment label names exactly ("L4", "vertebrae_L4", "L4 vertebra", "L4/L5",
    "L4-5", "L4-L5 disc", "disc_L5_S1"); ``None`` for anything else (never a partial match)."""
    t = re.sub(r"[_]+", " ", str(text or "").strip().lower())
    t = re.sub(r"\s+", " ", t)
    m = _TEXT_VERTEBRA.match(t)
    if m:
        return _BY_NAME.get(m.group(1).upper())
    t = re.sub(r"\s*/\s*", "/", t)
    m = _TEXT_DISC.match(t)
    if m:
        upper, lower = m.group(1).upper(), m.group(2).upper()
        if lower[0].isdigit():
            lower = upper[0] + lower
        name = f"{upper}/{lower}"
        level = _BY_NAME.get(name)
        return level if level is not None and level.kind == "disc" else None
    return None


def segment_level(segment) -> tuple[SpineLevel | None, str]:
    """(level, how) of one SegmentSequence item: by its property type code, by a generic
    vertebra/disc property type with the level as anatomic region or modifier, or by its label."""
    ptype = (segment.get("SegmentedPropertyTypeCodeSequence") or [None])[0]
    pcode = _code_of(ptype) if ptype is not None else None
    if pcode in _BY_CODE:
        return _BY_CODE[pcode], "code"
    if ptype is not None:
        meaning = str(ptype.get("CodeMeaning", "")).lower()
        generic_kind = ("disc" if "disc" in meaning or "disk" in meaning
                        else "vertebra" if pcode in _GENERIC_VERTEBRA or "vertebra" in meaning else None)
        if generic_kind:
            qualifiers = list(segment.get("AnatomicRegionSequence", []) or [])
            qualifiers += list(ptype.get("SegmentedPropertyTypeModifierCodeSequence", []) or [])
            for region in qualifiers:
                level = _BY_CODE.get(_code_of(region))
                if level is not None and level.kind == generic_kind:
                    return level, "code"
    level = level_from_text(segment.get("SegmentLabel", ""))
    if level is not None:
        return level, "label"
    return None, ""


def labels_spine_levels(dataset) -> bool:
    """Whether a SEG data set (header suffices) has at least one vertebra or disc segment, i.e.
    can be a level source; this node's own muscle SEG cannot. Never raises."""
    try:
        return any(segment_level(segment)[0] is not None for segment in dataset.get("SegmentSequence", []) or [])
    except Exception:  # a malformed header is no level source
        return False


@dataclass
class LabelledStructure:
    """The voxels of one labelled vertebra or disc, in patient space."""

    level: SpineLevel
    points_lps: np.ndarray  # (N, 3) voxel centres, mm
    spacing_vectors: np.ndarray  # (3, 3) voxel edge vectors, mm

    def half_extent_along(self, normal: np.ndarray) -> float:
        """Half the voxel's extent along ``normal`` (mm)."""
        return 0.5 * float(np.abs(self.spacing_vectors @ normal).sum())


@dataclass
class _SegSource:
    """A SEG of the study with level segments (from its header); voxels read on first use."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    series_number: str
    description: str
    frame_of_reference_uid: str
    segments: dict[str, list[int]]  # level name -> segment numbers
    by_label: bool  # at least one segment recognised by its label text only
    structures: list[LabelledStructure] | None = None
    error: str = ""

    @property
    def name(self) -> str:
        return f"SEG '{self.description}' (series {self.series_number or '?'})"

    def as_dict(self) -> dict:
        return {"sop_instance_uid": self.sop_instance_uid, "series_instance_uid": self.series_instance_uid,
                "series_description": self.description, "series_number": self.series_number,
                "levels_labelled": sorted(self.segments, key=level_sort_key),
                "recognised_by": "segment label text" if self.by_label else "SNOMED CT codes"}

    def load(self) -> list[LabelledStructure]:
        if self.structures is None and not self.error:
            try:
                self.structures = _read_structures(self.path, self.segments)
            except Exception as exc:  # an unreadable SEG costs only the levels
                self.error = f"{type(exc).__name__}: {exc}"[:200]
                log.warning("%s not usable for levels: %s", self.name, self.error)
        return self.structures or []


def _read_structures(path: Path, segments: dict[str, list[int]]) -> list[LabelledStructure]:
    import highdicom as hd

    seg = hd.seg.segread(path)
    fractional = str(seg.get("SegmentationType", "")) == "FRACTIONAL"
    out = []
    for name in sorted(segments, key=level_sort_key):
        volume = seg.get_volume(segment_numbers=segments[name], combine_segments=False,
                                allow_missing_positions=True, skip_overlap_checks=True)
        array = np.asarray(volume.array)
        mask = (array > 0.5) if fractional else (array > 0)
        if mask.ndim == 4:
            mask = mask.any(axis=3)
        indices = np.argwhere(mask)
        if indices.size == 0:
            continue
        points = np.asarray(volume.map_indices_to_reference(indices), dtype=np.float64)
        out.append(LabelledStructure(spine_level(name), points, np.asarray(volume.spacing_vectors(), dtype=np.float64)))
    return out


# --- the study's sources ---------------------------------------------------------------------

class StudyLevelSources:
    """The labelled sources of one study (:class:`~paraspinal.dicom_index.StudyRecord`), found
    from the headers once; each SEG's voxels are read the first time a stack on its frame of
    reference asks (:meth:`levels_for`)."""

    def __init__(self, study) -> None:
        self.sources: list[_SegSource] = []
        self.ignored: list[tuple[str, str]] = []  # (SEG name, why), independent of the stack
        for series in study.series.values():
            for record in series.instances:
                header = record.header
                if str(header.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
                    continue
                try:
                    self._consider(record.path, header)
                except Exception as exc:  # a malformed SEG header costs only that SEG
                    self.ignored.append((f"SEG {record.path.name}", f"its header cannot be read "
                                                                    f"({type(exc).__name__}: {exc})"[:200]))
        self.sources.sort(key=lambda s: (s.series_number, s.series_instance_uid, s.sop_instance_uid))

    def _consider(self, path: Path, header) -> None:
        name = (f"SEG '{str(header.get('SeriesDescription', '') or '').strip()}' "
                f"(series {str(header.get('SeriesNumber', '') or '?')})")
        segments: dict[str, list[int]] = {}
        by_label = False
        for segment in header.get("SegmentSequence", []) or []:
            level, how = segment_level(segment)
            if level is None:
                continue
            segments.setdefault(level.name, []).append(int(segment.SegmentNumber))
            by_label = by_label or how == "label"
        if not segments:
            self.ignored.append((name, "none of its segments is a vertebra or intervertebral disc "
                                       "(e.g. this node's own muscle SEG)"))
            return
        frame = str(header.get("FrameOfReferenceUID", "") or "").strip()
        self.sources.append(_SegSource(
            path=Path(path), sop_instance_uid=str(header.get("SOPInstanceUID", "")),
            series_instance_uid=str(header.get("SeriesInstanceUID", "")),
            series_number=str(header.get("SeriesNumber", "") or ""),
            description=str(header.get("SeriesDescription", "") or "").strip(),
            frame_of_reference_uid=frame, segments=segments, by_label=by_label))

    def levels_for(self, stack, labels: np.ndarray | None = None) -> SliceLevels:
        """Levels of one stack (:class:`~paraspinal.stacks.StackVolume`); ``labels`` (its muscle
        label volume) bounds the in-plane region the structures must lie in."""
        n = stack.n_slices
        frame = str(stack.datasets[0].get("FrameOfReferenceUID", "") or "").strip() if stack.datasets else ""
        notes = [f"{name} ignored: {why}" for name, why in self.ignored]
        usable: list[_SegSource] = []
        for source in self.sources:
            if not frame or source.frame_of_reference_uid != frame:
                notes.append(f"{source.name} ignored: it is on another frame of reference than this series, "
                             "so its labels cannot be placed on these slices")
                continue
            if not source.load():
                notes.append(f"{source.name} ignored: {source.error or 'its level segments are empty'}")
                continue
            usable.append(source)
        if not usable:
            if not notes:
                return determine_levels(n)
            return determine_levels(n, f"level unknown: {'; '.join(notes)}; {POSITION_NOTE}")
        structures = _pool([s for source in usable for s in source.structures])
        names = " + ".join(source.name for source in usable)
        problem = _order_problem(structures)
        if problem:
            return determine_levels(n, f"level unknown: {names} not used: {problem}; {POSITION_NOTE}")
        levels = assign_levels(stack, structures, labels)
        labelled = sorted({s.level.name for s in structures}, key=level_sort_key)
        by = "segment label text" if any(s.by_label for s in usable) else "SNOMED CT codes"
        method = (f"levels from {names} (vertebra/disc labels {', '.join(labelled)} recognised by {by}, same frame "
                  "of reference): a slice takes the disc its plane meets, else the vertebral body; slices outside "
                  f"the labelled structures have no level and are reported by slice position (LPS z, head +)")
        if notes:
            method += "; " + "; ".join(notes)
        return SliceLevels(levels=levels, determined=any(levels), method=method,
                           sources=[source.as_dict() for source in usable])


def _pool(structures: list[LabelledStructure]) -> list[LabelledStructure]:
    """One structure per level (the union of its voxels where several SEGs label it)."""
    by_level: dict[str, list[LabelledStructure]] = {}
    for s in structures:
        by_level.setdefault(s.level.name, []).append(s)
    out = []
    for name in sorted(by_level, key=level_sort_key):
        parts = by_level[name]
        if len(parts) == 1:
            out.append(parts[0])
            continue
        coarsest = max(parts, key=lambda p: float(np.abs(p.spacing_vectors).sum()))
        out.append(LabelledStructure(parts[0].level, np.concatenate([p.points_lps for p in parts]),
                                     coarsest.spacing_vectors))
    return out


def _order_problem(structures: list[LabelledStructure]) -> str:
    """Empty when the structures' centroids descend (LPS z, head +) in anatomical order."""
    ordered = sorted(structures, key=lambda s: level_sort_key(s.level.name))
    for upper, lower in zip(ordered, ordered[1:]):
        z_up, z_low = float(upper.points_lps[:, 2].mean()), float(lower.points_lps[:, 2].mean())
        if not z_up > z_low:
            return (f"its labels are not in anatomical order ({upper.level.name} centroid at z {z_up:+.1f} mm is not "
                    f"above {lower.level.name} at z {z_low:+.1f} mm)")
    return ""


def _region(stack, labels: np.ndarray | None) -> tuple[float, float, float, float]:
    """(col min, col max, row min, row max) in pixel units: the muscles' bounding box plus the
    margin, or the whole field of view."""
    rows, cols = stack.pixels.shape[1:]
    if labels is not None and labels.shape == stack.pixels.shape and np.any(labels > 0):
        present_rows = np.flatnonzero((labels > 0).any(axis=(0, 2)))
        present_cols = np.flatnonzero((labels > 0).any(axis=(0, 1)))
        row_mm, col_mm = stack.pixel_spacing_mm
        pad_r, pad_c = REGION_MARGIN_MM / row_mm, REGION_MARGIN_MM / col_mm
        return (present_cols[0] - pad_c, present_cols[-1] + pad_c, present_rows[0] - pad_r, present_rows[-1] + pad_r)
    return (-0.5, cols - 0.5, -0.5, rows - 0.5)


def assign_levels(stack, structures: list[LabelledStructure], labels: np.ndarray | None = None) -> list[str | None]:
    """The level of each slice of ``stack`` from labelled structures (rules in the module docstring)."""
    affine = np.asarray(stack.affine_lps, dtype=np.float64)
    row_vec, col_vec = affine[:3, 0], affine[:3, 1]
    col_mm, row_mm = float(np.linalg.norm(row_vec)), float(np.linalg.norm(col_vec))
    row_dir, col_dir = row_vec / col_mm, col_vec / row_mm
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    c0, c1, r0, r1 = _region(stack, labels)
    # Each structure's voxels in the stack's axes, relative to the first slice's origin.
    origin = affine[:3, 3]
    axes = np.stack([row_dir, col_dir, normal], axis=1)
    local = [((s.points_lps - origin) @ axes, s.half_extent_along(normal)) for s in structures]
    out: list[str | None] = []
    for k in range(stack.n_slices):
        offset = (affine[:3, 2] * k) @ axes  # slice k's origin in the same axes
        thickness = _thickness(stack, k)
        best = {"disc": None, "vertebra": None}
        for s, (q, half_voxel) in zip(structures, local):
            u = (q[:, 0] - offset[0]) / col_mm
            v = (q[:, 1] - offset[1]) / row_mm
            inside = (u >= c0) & (u <= c1) & (v >= r0) & (v <= r1)
            if not inside.any():
                continue
            d = np.abs(q[inside, 2] - offset[2])
            nearest = float(d.min())
            if nearest > max(0.5 * thickness, half_voxel):
                continue
            key = (-int((d <= half_voxel).sum()), nearest)  # the largest cut through it, then the nearest
            current = best[s.level.kind]
            if current is None or key < current[0]:
                best[s.level.kind] = (key, s.level.name)
        chosen = best["disc"] or best["vertebra"]
        out.append(chosen[1] if chosen else None)
    return out


def _thickness(stack, k: int) -> float:
    try:
        value = float(stack.datasets[k].get("SliceThickness", 0) or 0)
    except (TypeError, ValueError, IndexError):
        value = 0.0
    return value if value > 0 else float(stack.slice_step_mm or 0.0)
