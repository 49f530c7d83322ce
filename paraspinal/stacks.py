"""Split a series into geometrically consistent stacks and load each as a volume.

Lumbar axial T2 is often acquired as several short stacks angled to each disc within one
series. Slices are grouped by ImageOrientationPatient, ordered along the slice normal, and
split where the spacing jumps; each stack becomes one volume.

Voxel index order of :attr:`StackVolume.pixels` is (slice, row, col). The affine
:attr:`StackVolume.affine_lps` maps index (col, row, slice) - i.e. (i, j, k) with i along
the DICOM row direction - to LPS patient coordinates in mm.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from paraspinal.dicom_index import InstanceRecord, SeriesRecord


class StackError(ValueError):
    """A series cannot be turned into a usable volume; the message names the problem."""


#: What must end the process rather than fail one study (a Ctrl-C, ``sys.exit``, a generator
#: being closed); everything else a decoder raises is the study's failure.
STOP_EXCEPTIONS = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass(frozen=True)
class SliceGeometryHeader:
    """Geometry read from one instance header."""

    position: np.ndarray  # ImagePositionPatient, LPS mm
    row_dir: np.ndarray  # direction of increasing column index (first IOP triplet)
    col_dir: np.ndarray  # direction of increasing row index (second IOP triplet)
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    shape: tuple[int, int]  # (rows, columns)

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row_dir, self.col_dir)
        return n / np.linalg.norm(n)


def _numbers(header: Dataset, keyword: str, count: int) -> list[float]:
    """The ``count`` values of a numeric attribute as finite floats; raises :class:`StackError`
    naming the attribute and what is wrong with it (missing, how many values, not a number,
    not finite), never pydicom's or Python's own error text."""
    try:
        value = header.get(keyword)
    except Exception as exc:  # a raw value pydicom cannot convert
        raise StackError(f"{keyword} cannot be read ({type(exc).__name__}: {exc})") from None
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        raise StackError(f"missing {keyword}")
    items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    if len(items) != count:
        raise StackError(f"{keyword} has {len(items)} value{'' if len(items) == 1 else 's'}, expected {count}")
    numbers = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError, OverflowError):
            raise StackError(f"{keyword} value {str(item)[:24]!r} is not a number") from None
        if not math.isfinite(number):
            raise StackError(f"{keyword} value {str(item)[:24]} is not a finite number")
        numbers.append(number)
    return numbers


def slice_geometry(header: Dataset) -> SliceGeometryHeader:
    """Geometry of one image; raises :class:`StackError` naming the attribute that is missing
    or unusable (wrong number of values, not a number, NaN or infinite, not a unit vector,
    spacing or size not positive)."""
    iop = np.asarray(_numbers(header, "ImageOrientationPatient", 6), dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    if not (np.isclose(np.linalg.norm(row_dir), 1, atol=1e-2) and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-2)):
        raise StackError("ImageOrientationPatient direction cosines are not unit vectors")
    position = np.asarray(_numbers(header, "ImagePositionPatient", 3), dtype=np.float64)
    spacing = _numbers(header, "PixelSpacing", 2)
    if min(spacing) <= 0:
        raise StackError(f"PixelSpacing {spacing[0]:g}\\{spacing[1]:g} mm is not positive")
    rows, cols = (int(v) for v in _numbers(header, "Rows", 1) + _numbers(header, "Columns", 1))
    if rows <= 0 or cols <= 0:
        raise StackError(f"image size {rows} x {cols} (Rows x Columns) is empty")
    return SliceGeometryHeader(
        position=position,
        row_dir=row_dir / np.linalg.norm(row_dir),
        col_dir=col_dir / np.linalg.norm(col_dir),
        pixel_spacing=(spacing[0], spacing[1]),
        shape=(rows, cols),
    )


@dataclass
class StackPlan:
    """Instances of one stack, ordered by position along the slice normal (ascending)."""

    instances: list[InstanceRecord]
    geometries: list[SliceGeometryHeader]

    @property
    def slice_step_mm(self) -> float:
        if len(self.geometries) < 2:
            return 0.0
        positions = [float(np.dot(g.position, self.geometries[0].normal)) for g in self.geometries]
        return float(np.median(np.diff(positions)))


@dataclass
class StackVolume:
    """One stack as a volume with its geometry and source instances.

    Attributes:
        series_uid: SeriesInstanceUID of the source series.
        index: 1-based stack number within the series (ordered by position along z).
        datasets: one header per slice, in slice order: the full source instance (with pixel
            data) of a classic image, the frame's flattened header (no pixel data) of a frame of a
            multi-frame instance (see :mod:`paraspinal.enhanced_mr`).
        pixels: float32 array, voxel index order (slice, row, col), modality LUT applied.
        affine_lps: 4x4, maps (col, row, slice) indices to LPS patient mm.
        pixel_spacing_mm: (row spacing, column spacing) in mm, as DICOM PixelSpacing.
        slice_step_mm: distance between neighbouring slice centres along the normal, mm.
        frame_numbers: per slice, the 1-based frame number in its multi-frame instance, or
            ``None`` for a classic single-frame image; empty means all classic.
        source_instances: the distinct source instances (full datasets) in order of first use:
            what a SEG derives from and an SR cites as evidence; empty means ``datasets``.
    """

    series_uid: str
    index: int
    datasets: list[Dataset]
    pixels: np.ndarray
    affine_lps: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    slice_step_mm: float
    frame_numbers: list[int | None] = field(default_factory=list)
    source_instances: list[Dataset] = field(default_factory=list)

    def frame_number(self, k: int) -> int | None:
        """Frame number (1-based) of slice ``k`` in its multi-frame instance; ``None`` if classic."""
        return self.frame_numbers[k] if k < len(self.frame_numbers) else None

    @property
    def is_multi_frame(self) -> bool:
        return any(f is not None for f in self.frame_numbers)

    @property
    def sources(self) -> list[Dataset]:
        """The distinct source instances (see ``source_instances``)."""
        return self.source_instances or self.datasets

    @property
    def n_slices(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def pixel_area_mm2(self) -> float:
        return self.pixel_spacing_mm[0] * self.pixel_spacing_mm[1]

    @property
    def voxel_volume_mm3(self) -> float:
        return self.pixel_area_mm2 * self.slice_step_mm


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(abs(float(np.dot(a, b))), -1.0, 1.0))))


def plan_stacks(series: SeriesRecord, orientation_tolerance_deg: float) -> list[StackPlan]:
    """Group a series' instances into stacks; raises :class:`StackError` on unusable geometry."""
    entries: list[tuple[InstanceRecord, SliceGeometryHeader]] = []
    for record in series.instances:
        try:
            entries.append((record, slice_geometry(record.header)))
        except StackError as exc:
            raise StackError(f"{record.name}: {exc}") from None
    sizes = Counter((g.shape, tuple(round(s, 4) for s in g.pixel_spacing)) for _, g in entries)
    if len(sizes) > 1:
        detail = ", ".join(f"{r}x{c} @ {sp[0]}x{sp[1]} mm: {n} slices" for ((r, c), sp), n in sizes.most_common())
        raise StackError(f"slices have inconsistent sizes or pixel spacing ({detail})")

    groups: list[list[tuple[InstanceRecord, SliceGeometryHeader]]] = []
    for entry in entries:
        for group in groups:
            ref = group[0][1]
            if (_angle_deg(ref.normal, entry[1].normal) <= orientation_tolerance_deg
                    and _angle_deg(ref.row_dir, entry[1].row_dir) <= orientation_tolerance_deg):
                group.append(entry)
                break
        else:
            groups.append([entry])

    plans: list[StackPlan] = []
    for group in groups:
        normal = group[0][1].normal
        group.sort(key=lambda e: float(np.dot(e[1].position, normal)))
        positions = np.array([float(np.dot(g.position, normal)) for _, g in group])
        steps = np.diff(positions)
        if steps.size and np.min(steps) < 1e-3:
            raise StackError("two slices share one position (repeated acquisition in one series)")
        # Split where the gap jumps: parallel stacks at different levels share an orientation.
        median = float(np.median(steps)) if steps.size else 0.0
        cuts = [i + 1 for i, step in enumerate(steps) if step > 1.5 * median]
        for part in np.split(np.arange(len(group)), cuts):
            plans.append(StackPlan([group[i][0] for i in part], [group[i][1] for i in part]))
    plans.sort(key=lambda p: float(p.geometries[0].position[2]))
    return plans


def _decode(record: InstanceRecord) -> tuple[Dataset, np.ndarray]:
    """The full instance and its pixel array (frames first for a multi-frame one); a decoder's
    failure becomes a :class:`StackError` naming the file and transfer syntax."""
    ds = None
    try:
        ds = pydicom.dcmread(record.path)
        return ds, ds.pixel_array
    except STOP_EXCEPTIONS:
        raise
    except BaseException as exc:
        # Decoder errors come in many types, and a Rust codec's panic (pyo3's PanicException)
        # derives from BaseException only: any of them is this study's failure, naming the
        # file and transfer syntax.
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise StackError(f"{record.path.name}: pixel data could not be decoded (transfer syntax {syntax}): "
                         f"{type(exc).__name__}: {exc}") from None


def _frame_pixels(record: InstanceRecord, array: np.ndarray) -> np.ndarray:
    """Frame ``record.frame_number`` of a multi-frame instance's array, rescaled with the frame's
    Pixel Value Transformation (RescaleSlope/RescaleIntercept in its flattened header)."""
    frames = array if array.ndim == 3 else array[None]
    if array.ndim not in (2, 3) or not 1 <= record.frame_number <= frames.shape[0]:
        raise StackError(f"{record.name}: frame not in the pixel data (pixel array {array.shape})")
    header = record.header
    try:
        slope = float(header.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(header.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise StackError(f"{record.name}: RescaleSlope/RescaleIntercept (PixelValueTransformationSequence) "
                         "is not a number") from None
    return frames[record.frame_number - 1].astype(np.float32) * np.float32(slope) + np.float32(intercept)


def load_stack(plan: StackPlan, series_uid: str, index: int) -> StackVolume:
    """Read pixel data (decoding compressed transfer syntaxes) and build the stack volume.

    A multi-frame instance is read and decoded once for all its frames in the stack."""
    datasets, slices, frame_numbers, sources = [], [], [], []
    decoded: dict[Path, tuple[Dataset, np.ndarray]] = {}
    for record in plan.instances:
        if record.frame_number is None:
            ds, array = _decode(record)
            if array.ndim != 2:
                raise StackError(f"{record.path.name}: expected a single-frame grey image, got pixel array {array.shape}")
            datasets.append(ds)
            sources.append(ds)
            slices.append(np.asarray(apply_modality_lut(array, ds), dtype=np.float32))
            del ds
        else:
            if record.path not in decoded:
                decoded[record.path] = _decode(record)
                sources.append(decoded[record.path][0])
            datasets.append(record.header)
            slices.append(_frame_pixels(record, decoded[record.path][1]))
        frame_numbers.append(record.frame_number)
    first = plan.geometries[0]
    step = plan.slice_step_mm
    if len(plan.geometries) > 1:
        slice_vector = (plan.geometries[-1].position - first.position) / (len(plan.geometries) - 1)
    else:
        slice_vector = first.normal * float(datasets[0].get("SliceThickness", 1.0) or 1.0)
        step = float(np.linalg.norm(slice_vector))
    affine = np.eye(4)
    affine[:3, 0] = first.row_dir * first.pixel_spacing[1]
    affine[:3, 1] = first.col_dir * first.pixel_spacing[0]
    affine[:3, 2] = slice_vector
    affine[:3, 3] = first.position
    return StackVolume(
        series_uid=series_uid,
        index=index,
        datasets=datasets,
        pixels=np.stack(slices),
        affine_lps=affine,
        pixel_spacing_mm=first.pixel_spacing,
        slice_step_mm=float(step),
        frame_numbers=frame_numbers if any(f is not None for f in frame_numbers) else [],
        source_instances=sources if any(f is not None for f in frame_numbers) else [],
    )
