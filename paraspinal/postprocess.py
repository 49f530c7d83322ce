"""Label clean-up after inference, as the published method suggests.

Keeps the largest 3D connected component of each label (a muscle is one connected body
within a stack, so any other island is a false positive, typically a neighbouring muscle of
similar intensity) and fills holes slice by slice (fatty streaks inside a muscle belong to it
and are what fat quantification must measure; with 4-5 mm slices 3D hole filling is
meaningless). The application and the training/evaluation code share this implementation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from paraspinal.model_bundle import PostprocessingSpec


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty).

    Full connectivity, because with thick slices a muscle drifting in-plane between slices may
    touch its neighbour-slice part only diagonally.
    """
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in each 2D slice of a (slice, row, col) mask."""
    return np.stack([ndimage.binary_fill_holes(s) for s in mask]) if mask.shape[0] else mask


def clean_labels(labels: np.ndarray, largest_component_3d: bool = True, fill_holes: bool = True) -> np.ndarray:
    """Clean a (slice, row, col) label volume; returns a new array of the same shape and dtype.

    A hole is filled only where it is background (or already this label), so one muscle never
    overwrites its neighbour; where two labels could fill the same hole, the lower label wins.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label volume, got shape {labels.shape}")
    if not (largest_component_3d or fill_holes):
        return labels.copy()
    out = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        if largest_component_3d:
            mask = largest_component(mask)
        if fill_holes:
            mask = fill_holes_per_slice(mask) & ((labels == 0) | (labels == value))
        out[mask & (out == 0)] = value
    return out


def postprocess_labels(labels: np.ndarray, spec: PostprocessingSpec) -> np.ndarray:
    """Apply the bundle's post-processing to a (slice, row, col) label volume."""
    return clean_labels(labels, spec.largest_component_3d, spec.fill_holes)
