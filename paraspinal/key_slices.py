"""Which slices of a stack a reader sees first: one key slice per lumbar level, else per ~30 mm band.

Used by the PDF report's key images and by the SR's outline groups (the same slices in both),
so what a radiologist sees in the PDF and what the viewer shows from the SR agree.

Rule: the slices holding muscle are grouped by lumbar level where :mod:`paraspinal.levels`
determined it (head to feet); the slices without a level are split into bands of about 30 mm
along z (at most 6). In each group the key slice is the one with the largest total muscle area
(voxels of any muscle label), i.e. the slice where the muscles are best seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from paraspinal.levels import level_sort_key

BAND_MM = 30.0
MAX_BANDS = 6


@dataclass(frozen=True)
class KeySlice:
    """One key slice: ``index`` 0-based in the stack's slice order; ``slices`` the group it stands for
    (the level's or band's slices with muscle); ``level`` the lumbar level (``None`` for a band);
    ``title`` "level L4/L5" or "band 2"."""

    index: int
    slices: tuple[int, ...]
    level: str | None
    title: str


def slice_bands(z_mm: Sequence[float], present: Sequence[int], band_mm: float = BAND_MM,
                max_bands: int = MAX_BANDS) -> list[list[int]]:
    """Split the slices holding muscle into bands of about ``band_mm`` (mm along LPS z, at most ``max_bands``)."""
    present = sorted(present, key=lambda k: z_mm[k])
    if not present:
        return []
    lo, hi = z_mm[present[0]], z_mm[present[-1]]
    n = max(1, min(max_bands, len(present), int(math.ceil((hi - lo + 1e-6) / band_mm))))
    edges = np.linspace(lo, hi, n + 1)
    bands: list[list[int]] = [[] for _ in range(n)]
    for k in present:
        i = min(n - 1, int(np.searchsorted(edges, z_mm[k], side="right") - 1))
        bands[max(0, i)].append(k)
    return [b for b in bands if b]


def key_slices(z_mm: Sequence[float], levels: Sequence[str | None], present: Sequence[int],
               muscle_area: Callable[[int], float]) -> list[KeySlice]:
    """The key slices of one stack: one per lumbar level (head to feet), then one per ~30 mm band
    of the slices with muscle that have no level.

    ``z_mm``: LPS z (mm) of each slice centre; ``levels``: each slice's lumbar level or ``None``;
    ``present``: indices of the slices holding any muscle; ``muscle_area(k)``: the total muscle
    area on slice ``k`` in any unit (only compared).
    """
    present = sorted(set(present))
    by_level: dict[str, list[int]] = {}
    for k in present:
        if k < len(levels) and levels[k]:
            by_level.setdefault(levels[k], []).append(k)
    groups: list[tuple[str, str | None, list[int]]] = [
        (f"level {name}", name, by_level[name]) for name in sorted(by_level, key=level_sort_key)]
    rest = [k for k in present if not (k < len(levels) and levels[k])]
    groups += [(f"band {i + 1}", None, band) for i, band in enumerate(slice_bands(z_mm, rest))]
    out = []
    for title, level, group in groups:
        areas = [muscle_area(k) for k in group]
        out.append(KeySlice(index=group[int(np.argmax(areas))], slices=tuple(group), level=level, title=title))
    return out
