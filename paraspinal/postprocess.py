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


#: Largest label value for which the boxes come from one ``ndimage.find_objects`` pass (it lists a
#: box for every value up to the largest); other volumes look their labels up with ``np.unique``.
_MAX_LABEL_FOR_FIND_OBJECTS = 4096


def _label_boxes(labels: np.ndarray) -> list[tuple[object, tuple[slice, ...]]]:
    """(label, bounding box) of every non-zero label present, in ascending label order."""
    if labels.dtype.kind in "ui" and labels.size:
        low, high = (0, int(labels.max())) if labels.dtype.kind == "u" else (int(labels.min()), int(labels.max()))
        if low >= 0 and high <= _MAX_LABEL_FOR_FIND_OBJECTS:
            found = ndimage.find_objects(labels)  # one pass over the volume for all labels
            return [(labels.dtype.type(index + 1), box) for index, box in enumerate(found) if box is not None]
    out = []
    for value in np.unique(labels):
        if value == 0:
            continue
        where = np.nonzero(labels == value)
        out.append((value, tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)))
    return out


def clean_labels(labels: np.ndarray, largest_component_3d: bool = True, fill_holes: bool = True) -> np.ndarray:
    """Clean a (slice, row, col) label volume; returns a new array of the same shape and dtype.

    Each label keeps its largest 26-connected component and has its holes filled slice by slice.
    A hole is filled only where it is background (or already this label), so one muscle never
    overwrites its neighbour; where two labels could fill the same hole, the lower label wins.

    Each label is worked on inside its bounding box (about 20x faster than on the whole
    512 x 512 x 50 volume once per label, ``benchmarks/results/history.md``) with the result of
    doing it on the whole volume: a label's connected components lie inside its box (and raster
    order, which breaks ties between equal components, is kept within it); for hole filling the
    box is widened by one pixel in-plane, so background outside the box reaches the crop's border
    as it reaches the image's border in the full slice (``tests/test_benchmarks_equivalence.py``
    compares it with the whole-volume code, ``benchmarks.parts.reference_clean_labels``).
    """
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label volume, got shape {labels.shape}")
    if not (largest_component_3d or fill_holes):
        return labels.copy()
    out = np.zeros_like(labels)
    for value, box in _label_boxes(labels):
        box = (box[0],) + tuple(slice(max(0, b.start - 1), min(n, b.stop + 1))
                                for b, n in zip(box[1:], labels.shape[1:]))
        sub = labels[box]
        mask = sub == value
        if largest_component_3d:
            mask = largest_component(mask)
        if fill_holes:
            mask = fill_holes_per_slice(mask) & ((sub == 0) | (sub == value))
        target = out[box]  # a view: writes go to ``out``
        target[mask & (target == 0)] = value
    return out


def postprocess_labels(labels: np.ndarray, spec: PostprocessingSpec) -> np.ndarray:
    """Apply the bundle's post-processing to a (slice, row, col) label volume."""
    return clean_labels(labels, spec.largest_component_3d, spec.fill_holes)
