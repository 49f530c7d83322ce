"""Label clean-up after inference: largest 3D connected component per muscle + hole filling.

Wesselink et al. suggest keeping the largest connected 3D component of each muscle: a
muscle is one connected body within a stack, so any other island is a false positive
(typically a neighbouring muscle of similar intensity). Holes are filled slice by slice,
because fatty streaks inside a muscle belong to it (they are what fat quantification must
measure) and a 4-5 mm slice spacing makes 3D hole filling meaningless.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from paraspinal.postprocess import clean_labels, largest_component

# The application's implementation, under the name the training code has used.
largest_component_3d = largest_component


def slice_axis(spacing: Sequence[float]) -> int:
    """The through-plane axis of a stack: the axis with the largest voxel spacing (mm).

    Ties (isotropic voxels) resolve to the last such axis, the slice axis of a NIfTI/RAS
    (I, J, K) volume.
    """
    spacing = [float(s) for s in spacing]
    best = max(spacing)
    return max(i for i, s in enumerate(spacing) if np.isclose(s, best, rtol=1e-3))


def postprocess_labels(labels: np.ndarray, spacing: Sequence[float], largest_component: bool = True,
                       fill_holes: bool = True) -> np.ndarray:
    """Clean a 3D label volume in any axis order with the application's post-processing
    (:func:`paraspinal.postprocess.clean_labels`); the axis with the largest spacing (mm) is
    taken as the slice axis for hole filling. Returns a new array, same shape and dtype.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label volume, got shape {labels.shape}")
    if len(spacing) != 3:
        raise ValueError(f"expected 3 spacings (mm), got {spacing!r}")
    axis = slice_axis(spacing)
    cleaned = clean_labels(np.moveaxis(labels, axis, 0), largest_component, fill_holes)
    return np.ascontiguousarray(np.moveaxis(cleaned, 0, axis))
