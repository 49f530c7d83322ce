"""A muscle's outline on one source image, as a closed polygon a viewer can draw (SR SCOORD POLYLINE).

Coordinates are DICOM image coordinates (PS3.3 C.18.6.1.1, SCOORD): (column, row) in pixels of
the source image, the top-left corner of the top-left pixel at (0, 0), so the centre of the pixel
at array index [r, c] is (c + 0.5, r + 0.5).

The outline is the iso-line at 0.5 of the binary mask (:func:`skimage.measure.find_contours`,
sub-pixel, through the mid-points between pixel centres), simplified with Douglas-Peucker
(:func:`skimage.measure.approximate_polygon`, tolerance in pixels) so that the SR stays small.
A muscle in several pieces on one slice (e.g. a split erector spinae) is outlined by its largest
piece; the group's area still measures every piece, and ``n_components`` says how many there are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

#: Douglas-Peucker tolerance, pixels: at 0.4-1 mm pixels the simplified outline stays within about
#: half a millimetre of the mask boundary while keeping some 30-80 points per muscle.
SIMPLIFY_TOLERANCE_PX = 0.5


@dataclass(frozen=True)
class Outline:
    """A closed polygon on one image: ``points`` (N, 2) float (column, row) image coordinates with
    ``points[0] == points[-1]``; ``n_components`` the 2D connected pieces of the mask (8-connected)."""

    points: np.ndarray
    n_components: int

    def enclosed_area_px(self) -> float:
        """Area enclosed by the polygon, pixels (shoelace formula)."""
        x, y = self.points[:, 0], self.points[:, 1]
        return float(0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def _polygon_area(contour: np.ndarray) -> float:
    r, c = contour[:, 0], contour[:, 1]
    return float(0.5 * abs(np.dot(r[:-1], c[1:]) - np.dot(r[1:], c[:-1])))


def muscle_outline(mask: np.ndarray, tolerance_px: float = SIMPLIFY_TOLERANCE_PX) -> Outline | None:
    """The outline of the largest piece of a 2D binary ``mask`` (rows, columns) of a source image;
    ``None`` when the mask is empty. See the module docstring for the coordinate convention."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    pieces, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    largest = 1 + int(np.argmax(ndimage.sum_labels(mask, pieces, index=range(1, n + 1))))
    # A one-pixel frame of background so that a piece touching the image border gets a closed contour.
    padded = np.pad(pieces == largest, 1).astype(np.float32)
    contours = [c for c in find_contours(padded, 0.5) if len(c) >= 4 and np.allclose(c[0], c[-1])]
    if not contours:
        return None
    contour = max(contours, key=_polygon_area) - 1.0  # undo the padding: array indices (row, col)
    simplified = approximate_polygon(contour, tolerance=tolerance_px)
    if len(simplified) < 4:  # a tiny piece simplifies to a line: keep the raw contour
        simplified = contour
    points = simplified[:, ::-1] + 0.5  # (row, col) indices -> (column, row) image coordinates
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return Outline(points=np.round(points, 2), n_components=n)
