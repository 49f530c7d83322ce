"""Lumbar level of each slice, or an honest "unknown".

A level (L1/L2 ... L5/S1) is reported only where it is determined from the images; it is never
guessed from slice order, slice count or field-of-view position, because a wrong level
silently corrupts every per-level comparison. This version has no validated way to determine
it: no disc or vertebra detector ships with the node, and cross-referencing a sagittal series
needs the discs located on that sagittal series first. So every slice is reported by its
position, the LPS z coordinate of its centre (mm, head +), and the outputs say so.

Future work (documented in README "Measurements"): locate the discs on the study's sagittal
T2 (a labelled disc/vertebra model), map each axial slice's centre into the sagittal frame
(both series share the FrameOfReferenceUID), assign the nearest disc or vertebral body, and
validate on labelled cases before switching :func:`determine_levels` on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LEVEL_UNKNOWN_REASON = ("level unknown: this version does not determine lumbar levels; "
                        "measurements are reported by slice position (LPS z of the slice centre, head +)")


@dataclass
class SliceLevels:
    """Per-slice level labels of one stack; ``None`` where the level is unknown."""

    levels: list[str | None] = field(default_factory=list)
    determined: bool = False
    method: str = LEVEL_UNKNOWN_REASON

    def as_dict(self) -> dict:
        return {"levels": self.levels, "determined": self.determined, "method": self.method}


def determine_levels(n_slices: int) -> SliceLevels:
    """Levels of a stack's slices. Always unknown in this version (see the module docstring)."""
    return SliceLevels(levels=[None] * int(n_slices), determined=False, method=LEVEL_UNKNOWN_REASON)
