"""Muscle size and intramuscular fat, per muscle and side, for one stack.

Units: cross-sectional area (CSA) in mm² per slice, from PixelSpacing (0028,0030); volume
in cm³ as the sum of slice CSAs times the slice step (distance between slice centres along
the normal, from ImagePositionPatient), so a gap between slices counts as muscle like in the
published method; fat fraction in % of the muscle's voxels.

Fat methods map the intensities inside one muscle to a per-voxel fat share in [0, 1]
(0/1 for threshold methods); new methods register in :data:`FAT_METHODS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from skimage.filters import threshold_otsu

from paraspinal.model_bundle import LabelInfo
from paraspinal.stacks import StackVolume


def otsu_fat_share(values: np.ndarray) -> np.ndarray:
    """Fat (1) where the intensity exceeds Otsu's threshold of the muscle's own histogram.

    Fat is bright on T2 TSE. Otsu always splits the histogram in two, so even a lean muscle
    gets some "fat": the published method's known bias, kept here as the reference method.
    """
    if values.size < 2 or float(values.min()) == float(values.max()):
        return np.zeros(values.shape, dtype=np.float32)
    return (values > threshold_otsu(values)).astype(np.float32)


FAT_METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"otsu": otsu_fat_share}


@dataclass
class MuscleMeasurement:
    """Measures of one muscle on one side in one stack.

    Per-slice lists follow the stack's slice order (ascending along the slice normal);
    ``slice_z_mm`` is the LPS z (head +) of each slice's centre.
    """

    label: int
    muscle: str
    side: str
    stack_index: int
    found: bool
    n_voxels: int
    fat_method: str
    slice_z_mm: list[float] = field(default_factory=list)
    slice_csa_mm2: list[float] = field(default_factory=list)
    slice_fat_csa_mm2: list[float] = field(default_factory=list)
    slice_fat_fraction_pct: list[float | None] = field(default_factory=list)
    volume_cm3: float = 0.0
    mean_csa_mm2: float = 0.0
    max_csa_mm2: float = 0.0
    fat_fraction_pct: float | None = None

    @property
    def name(self) -> str:
        return f"{self.muscle} {self.side}"

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


def measure_stack(stack: StackVolume, labels: np.ndarray, label_table: tuple[LabelInfo, ...],
                  fat_method: str = "otsu", min_voxels: int = 20) -> list[MuscleMeasurement]:
    """Measure every label of ``label_table`` in one stack.

    Args:
        stack: the source volume; intensities are taken from ``stack.pixels``.
        labels: (slice, row, col) label volume on the stack's grid.
        label_table: labels to report, from the model bundle.
        fat_method: key of :data:`FAT_METHODS`.
        min_voxels: below this many voxels a muscle is reported as not found.
    """
    if labels.shape != stack.pixels.shape:
        raise ValueError(f"label volume {labels.shape} does not match the stack {stack.pixels.shape}")
    try:
        fat_share_of = FAT_METHODS[fat_method]
    except KeyError:
        raise ValueError(f"unknown fat method {fat_method!r}; known: {', '.join(FAT_METHODS)}") from None
    z = _slice_centres_z(stack)
    area = stack.pixel_area_mm2
    results = []
    for info in label_table:
        mask = labels == info.value
        n_voxels = int(mask.sum())
        result = MuscleMeasurement(info.value, info.muscle, info.side, stack.index, n_voxels >= min_voxels,
                                   n_voxels, fat_method, slice_z_mm=z)
        share = np.zeros(stack.pixels.shape, dtype=np.float32)
        if result.found:
            share[mask] = fat_share_of(stack.pixels[mask])
        per_slice_voxels = mask.sum(axis=(1, 2))
        per_slice_fat = share.sum(axis=(1, 2))
        result.slice_csa_mm2 = [round(float(v) * area, 2) for v in per_slice_voxels]
        result.slice_fat_csa_mm2 = [round(float(v) * area, 2) for v in per_slice_fat]
        result.slice_fat_fraction_pct = [
            round(100.0 * float(f) / float(v), 2) if v > 0 and result.found else None
            for v, f in zip(per_slice_voxels, per_slice_fat)
        ]
        if result.found:
            present = per_slice_voxels > 0
            result.volume_cm3 = round(float(per_slice_voxels.sum()) * stack.voxel_volume_mm3 / 1000.0, 3)
            result.mean_csa_mm2 = round(float(per_slice_voxels[present].mean()) * area, 2)
            result.max_csa_mm2 = round(float(per_slice_voxels.max()) * area, 2)
            result.fat_fraction_pct = round(100.0 * float(share[mask].sum()) / n_voxels, 2)
        results.append(result)
    return results
