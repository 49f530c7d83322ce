"""Label clean-up after inference, as the published method suggests.

Keeps the largest 3D connected component of each label (a muscle is one connected body
within a stack) and fills holes slice by slice (fatty streaks inside a muscle belong to it).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from paraspinal.model_bundle import PostprocessingSpec


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in each 2D slice of a (slice, row, col) mask."""
    return np.stack([ndimage.binary_fill_holes(s) for s in mask]) if mask.size else mask


def postprocess_labels(labels: np.ndarray, spec: PostprocessingSpec) -> np.ndarray:
    """Apply the bundle's post-processing to a (slice, row, col) label volume."""
    if not (spec.largest_component_3d or spec.fill_holes):
        return labels
    out = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        if spec.largest_component_3d:
            mask = largest_component(mask)
        if spec.fill_holes:
            # Fill only into background so one muscle never overwrites its neighbour.
            mask = fill_holes_per_slice(mask) & ((labels == 0) | (labels == value))
        out[mask & (out == 0)] = value
    return out
