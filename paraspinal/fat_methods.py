"""Intramuscular fat on T2-weighted images: the selectable methods and their registry.

Every method sees ALL muscles of one stack at once (the image, the label volume and the
muscle labels to separate) and returns a per-voxel fat share in [0, 1] inside the muscles:
0/1 for the classification methods, continuous for the signal-fraction method. A muscle's fat
fraction is then the mean share over its voxels, its fat cross-sectional area the sum of the
shares times the pixel area. Seeing the whole stack is what the outlier-corrected threshold
needs (it compares one muscle's threshold with the other muscles'), and what the continuous
method needs (its references come from the muscles and from the subcutaneous fat of the same
image). Fat is bright on T2 TSE (and on T1 and in-phase images), so every method assumes it.

The unit of separation is one muscle on one slice, as in the published 2D methods (Xu et al.
thresholded each muscle on each analysed slice): a slice's own histogram follows that slice's
coil sensitivity. A muscle section with fewer than ``min_slice_voxels`` voxels is too small
for its own histogram; it uses the muscle's whole-stack estimate instead.

Methods (key in ``quantification.fat_method``; private code in the SR):

``otsu``
    Otsu's threshold of the muscle's histogram; brighter voxels are fat (Niemeyer et al.,
    external validation). Otsu always splits a histogram in two, so a lean muscle still gets
    "fat": the method's known upward bias at low fat content.
``otsu_outlier``
    Otsu per muscle, then on each slice a muscle whose threshold lies outside mean ± 1.96 SD
    of the other muscles' thresholds on that slice takes their mean (Xu et al.); needs at least
    three other muscles on the slice.
``kmeans``
    Two-class k-means of the intensities (Xia et al.); in one dimension this is the threshold
    halfway between the two class means, iterated to convergence.
``gmm``
    Two-component Gaussian mixture fitted by expectation-maximisation (initialised from the
    k-means classes); a voxel is fat where the bright component's posterior exceeds 0.5.
``signal_fraction``
    Continuous fat-signal fraction: each voxel's fat share is where its intensity S lies between
    a lean-muscle reference and a subcutaneous-fat reference taken from the same slice of the
    same image, share = (S - S_lean) / (S_fat - S_lean) clipped to [0, 1]: 0 at the lean
    reference, 1 at the fat reference (see :func:`signal_fraction_references`). Under a
    two-compartment model this is the volume share of fat in the voxel, whatever the weighting
    of the image, and with fat and muscle of similar proton density it estimates the PDFF.

Not a product method: :func:`fat_signal_share` weights that share by the compartments' signals
(a * S_fat / S, the fat share of the voxel's *signal*). It equals F / (W + F) only when the
input has the same fat/muscle contrast as the Dixon images the fraction was computed from; on
the MuscleMap TSE sample, where subcutaneous fat is ~50 times brighter than psoas, it turns noise
in dark muscle into tens of percent of "fat" (psoas 39 %). ``tools/validate_fat.py`` reports it
as a diagnostic only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

#: A muscle section (one muscle on one slice) needs this many voxels for its own estimate.
MIN_SLICE_VOXELS = 30
#: Outlier rule of the corrected threshold: z-score limit and the fewest other muscles to compare with.
OUTLIER_Z = 1.96
OUTLIER_MIN_OTHERS = 3
#: Lean reference: this percentile of the muscle section's intensities (the median of its darker
#: half), which stays on the lean-muscle peak while fewer than half of the voxels are fat.
LEAN_PERCENTILE = 25.0
#: Subcutaneous fat is looked for within this depth (mm) under the body surface.
SUBCUTANEOUS_DEPTH_MM = 15.0
#: Fewest bright ring voxels for a slice's own fat reference.
MIN_FAT_REFERENCE_VOXELS = 50


@dataclass
class FatInput:
    """One stack, everything a method may look at.

    Attributes:
        image: (slice, row, col) float intensities (after optional bias-field correction).
        labels: (slice, row, col) integer label volume on the same grid.
        muscles: label values to separate (the muscles found in the stack).
        pixel_spacing_mm: (row spacing, column spacing), for the subcutaneous depth.
        min_slice_voxels: smallest muscle section that gets its own estimate.
    """

    image: np.ndarray
    labels: np.ndarray
    muscles: tuple[int, ...]
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0)
    min_slice_voxels: int = MIN_SLICE_VOXELS


@dataclass
class FatResult:
    """A method's output for one stack.

    Attributes:
        share: float32 (slice, row, col) fat share per voxel in [0, 1]; 0 outside the muscles.
        thresholds: per muscle, per slice, the intensity threshold used (classification
            methods; ``None`` on slices without that muscle).
        replaced: per muscle, the slices whose threshold the outlier rule replaced.
        lean_reference / fat_reference: per muscle per slice, and per slice, the references of
            the signal-fraction method.
        notes: plain-language remarks (fallbacks taken), for the results and the report.
    """

    share: np.ndarray
    thresholds: dict[int, list[float | None]] = field(default_factory=dict)
    replaced: dict[int, list[int]] = field(default_factory=dict)
    lean_reference: dict[int, list[float | None]] = field(default_factory=dict)
    fat_reference: list[float | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FatMethod:
    """A registered method: key, its private code in the SR, and the function."""

    key: str
    code: str  # code value in the private scheme 99PARASPINAL (at most 16 characters)
    meaning: str  # code meaning (at most 64 characters)
    kind: str  # "classification" (0/1 share) or "continuous"
    run: Callable[[FatInput], FatResult]


# --- one-dimensional two-class separators -------------------------------------------------

def otsu_threshold(values: np.ndarray) -> float | None:
    """Otsu's threshold; ``None`` when the values cannot be split (fewer than 2, or constant)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or float(values.min()) == float(values.max()):
        return None
    return float(threshold_otsu(values))


def kmeans_threshold(values: np.ndarray, max_iter: int = 100) -> float | None:
    """Two-class k-means in one dimension: the midpoint of the class means at convergence.

    Deterministic: starts from the 10th and 90th percentiles.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or float(values.min()) == float(values.max()):
        return None
    means = np.percentile(values, [10.0, 90.0])
    if means[0] == means[1]:
        means = np.array([values.min(), values.max()], dtype=np.float64)
    for _ in range(max_iter):
        cut = means.mean()
        low, high = values[values <= cut], values[values > cut]
        if low.size == 0 or high.size == 0:
            break
        new = np.array([low.mean(), high.mean()])
        if np.allclose(new, means, rtol=0, atol=1e-9 * max(1.0, abs(cut))):
            means = new
            break
        means = new
    return float(means.mean())


def gmm_fat_posterior(values: np.ndarray, max_iter: int = 200, tol: float = 1e-7) -> np.ndarray | None:
    """Posterior probability of the brighter of two Gaussian components, per value.

    Expectation-maximisation in one dimension, initialised from the two k-means classes;
    variances are floored at 1e-6 of the data variance so a component cannot collapse.
    ``None`` when the values cannot be split.
    """
    values = np.asarray(values, dtype=np.float64)
    cut = kmeans_threshold(values)
    if cut is None:
        return None
    low, high = values[values <= cut], values[values > cut]
    if low.size == 0 or high.size == 0:
        return None
    var_floor = max(1e-6 * float(values.var()), 1e-12)
    weight = np.array([low.size, high.size], dtype=np.float64) / values.size
    mean = np.array([low.mean(), high.mean()])
    var = np.maximum(np.array([low.var(), high.var()]), var_floor)
    previous = -np.inf
    for _ in range(max_iter):
        log_p = (np.log(weight)[:, None] - 0.5 * np.log(2 * np.pi * var)[:, None]
                 - 0.5 * (values[None, :] - mean[:, None]) ** 2 / var[:, None])
        top = log_p.max(axis=0)
        log_total = top + np.log(np.exp(log_p - top).sum(axis=0))
        resp = np.exp(log_p - log_total)
        likelihood = float(log_total.sum())
        n_k = resp.sum(axis=1)
        if np.any(n_k < 1e-9):
            break
        weight = n_k / values.size
        mean = (resp * values).sum(axis=1) / n_k
        var = np.maximum((resp * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / n_k, var_floor)
        if likelihood - previous < tol * abs(likelihood):
            break
        previous = likelihood
    bright = int(np.argmax(mean))
    return resp[bright]


def linear_fat_share(values: np.ndarray, lean: float, fat: float) -> np.ndarray:
    """Each voxel's fat share from its intensity between the references:
    ``(S - lean) / (fat - lean)`` clipped to [0, 1] (0 at the lean reference, 1 at the fat one)."""
    values = np.asarray(values, dtype=np.float64)
    if not fat > lean:
        raise ValueError(f"the fat reference ({fat:g}) must be brighter than the lean reference ({lean:g})")
    return np.clip((values - lean) / (fat - lean), 0.0, 1.0).astype(np.float32)


def fat_signal_share(values: np.ndarray, lean: float, fat: float) -> np.ndarray:
    """Fat share of each voxel's SIGNAL between a lean and a fat reference (diagnostic only).

    Two compartments: a voxel of intensity S holds the volume share a = (S - lean) / (fat - lean)
    of fat, whose signal is a * fat, so the fat share of its signal is
    ``fat * (S - lean) / (S * (fat - lean))``, clipped to [0, 1]: exactly 0 at S = lean and 1 at
    S = fat (darker voxels are lean, brighter ones fat).
    """
    values = np.asarray(values, dtype=np.float64)
    if not fat > lean:
        raise ValueError(f"the fat reference ({fat:g}) must be brighter than the lean reference ({lean:g})")
    safe = np.maximum(values, lean if lean > 0 else np.finfo(np.float64).tiny)
    share = fat * (values - lean) / (safe * (fat - lean))
    return np.clip(share, 0.0, 1.0).astype(np.float32)


# --- helpers over a stack ----------------------------------------------------------------

def _sections(inp: FatInput):
    """(label, slice, mask of the section) for every muscle section with any voxel."""
    for label in inp.muscles:
        present = np.flatnonzero((inp.labels == label).any(axis=(1, 2)))
        for k in present:
            yield label, int(k), inp.labels[k] == label


def _classification(inp: FatInput, threshold_of: Callable[[np.ndarray], float | None],
                    outlier_correction: bool = False) -> FatResult:
    """Threshold methods: a threshold per muscle section, fallback to the muscle's stack threshold."""
    n = inp.image.shape[0]
    result = FatResult(share=np.zeros(inp.image.shape, dtype=np.float32))
    stack_threshold = {label: threshold_of(inp.image[inp.labels == label]) for label in inp.muscles}
    for label in inp.muscles:
        result.thresholds[label] = [None] * n
        result.replaced[label] = []
    fallbacks = 0
    for label, k, mask in _sections(inp):
        values = inp.image[k][mask]
        t = threshold_of(values) if values.size >= inp.min_slice_voxels else None
        if t is None:
            t = stack_threshold[label]
            fallbacks += 1
        result.thresholds[label][k] = t
    if outlier_correction:
        for k in range(n):
            on_slice = {label: result.thresholds[label][k] for label in inp.muscles
                        if result.thresholds[label][k] is not None}
            corrected = {}
            for label, t in on_slice.items():
                others = np.array([v for other, v in on_slice.items() if other != label], dtype=np.float64)
                if others.size < OUTLIER_MIN_OTHERS:
                    continue
                mean, sd = float(others.mean()), float(others.std(ddof=1))
                if sd > 0 and abs(t - mean) > OUTLIER_Z * sd:
                    corrected[label] = mean
            for label, t in corrected.items():  # compared with the original thresholds, then replaced
                result.thresholds[label][k] = t
                result.replaced[label].append(k)
    for label, k, mask in _sections(inp):
        t = result.thresholds[label][k]
        if t is not None:
            result.share[k][mask] = (inp.image[k][mask] > t).astype(np.float32)
    if fallbacks:
        result.notes.append(f"{fallbacks} muscle section(s) under {inp.min_slice_voxels} voxels used their "
                            "muscle's whole-stack threshold")
    return result


def run_otsu(inp: FatInput) -> FatResult:
    return _classification(inp, otsu_threshold)


def run_otsu_outlier(inp: FatInput) -> FatResult:
    return _classification(inp, otsu_threshold, outlier_correction=True)


def run_kmeans(inp: FatInput) -> FatResult:
    return _classification(inp, kmeans_threshold)


def _gmm_threshold(values: np.ndarray) -> float | None:
    """The intensity where the bright component's posterior crosses 0.5 (the Bayes boundary)."""
    posterior = gmm_fat_posterior(values)
    if posterior is None:
        return None
    order = np.argsort(values)
    fat = posterior[order] > 0.5
    if not fat.any():
        return float(values.max())
    if fat.all():
        return float(values.min()) - 1e-6
    # Lowest intensity classified fat above the brightest lean voxel (the boundary is monotonic
    # except for a wide dark component, whose far dark tail must not count as fat).
    last_lean = int(np.flatnonzero(~fat)[-1])
    return float(values[order][last_lean])


def run_gmm(inp: FatInput) -> FatResult:
    return _classification(inp, _gmm_threshold)


#: 4-connectivity in 2D: scipy's default structure for binary_fill_holes.
_CROSS = ndi.generate_binary_structure(2, 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` of a 2D mask, by labelling the background once:
    the holes are the 4-connected background regions that do not touch the image border (scipy
    grows the background in from the border, one dilation per pixel of distance; same result)."""
    mask = np.asarray(mask, dtype=bool)
    background, count = ndi.label(~mask, structure=_CROSS)
    if count == 0:
        return mask.copy()
    outside = np.zeros(count + 1, dtype=bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        outside[edge] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


def body_mask(slice_image: np.ndarray) -> np.ndarray:
    """The body on one slice: above half Otsu's threshold of the slice, closed, holes filled,
    largest connected region."""
    image = np.asarray(slice_image, dtype=np.float64)
    t = otsu_threshold(image.ravel())
    if t is None:
        return np.zeros(image.shape, dtype=bool)
    mask = fill_holes(ndi.binary_closing(image > 0.5 * t, iterations=3))
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def subcutaneous_fat_reference(slice_image: np.ndarray, slice_labels: np.ndarray,
                               pixel_spacing_mm: tuple[float, float],
                               depth_mm: float = SUBCUTANEOUS_DEPTH_MM) -> float | None:
    """Median intensity of the subcutaneous fat on one slice, or ``None`` if too little is seen.

    The ring of the body within ``depth_mm`` of its surface (the image border does not count as
    surface: a field of view that cuts the body has no skin there) holds skin and subcutaneous
    fat; muscle labels are excluded; the bright class of the ring (Otsu) is the fat. Unlike a
    high percentile of all body voxels, the ring never picks up fluid (CSF, which is as bright
    as fat on T2) in the spinal canal.
    """
    body = body_mask(slice_image)
    if not body.any():
        return None
    depth_px = max(1, int(round(depth_mm / max(1e-6, min(pixel_spacing_mm)))))
    inner = ndi.binary_erosion(body, iterations=depth_px, border_value=1)
    ring = body & ~inner & (slice_labels == 0)
    values = np.asarray(slice_image, dtype=np.float64)[ring]
    t = otsu_threshold(values)
    if t is None:
        return None
    fat = values[values > t]
    if fat.size < MIN_FAT_REFERENCE_VOXELS:
        return None
    return float(np.median(fat))


def signal_fraction_references(inp: FatInput) -> tuple[dict[int, list[float | None]], list[float | None], list[str]]:
    """Lean references per muscle per slice and fat references per slice, with notes.

    Lean: the 25th percentile of the muscle section's intensities (median of the darker half:
    on the lean-muscle peak as long as fewer than half of its voxels are fat). It is taken per
    muscle because muscles differ in lean signal by more than the fat they hold (coil distance,
    B1; on the Dixon validation case multifidus was about 15 % darker than erector spinae on the
    same slice), and per slice because coil sensitivity changes along z. A section under
    ``min_slice_voxels`` voxels takes its muscle's whole-stack percentile.
    Fat: the subcutaneous fat of the same slice (:func:`subcutaneous_fat_reference`); a slice
    without enough visible subcutaneous fat takes the median of the other slices' references.
    """
    n = inp.image.shape[0]
    notes: list[str] = []
    lean: dict[int, list[float | None]] = {label: [None] * n for label in inp.muscles}
    stack_lean = {}
    for label in inp.muscles:
        values = inp.image[inp.labels == label]
        stack_lean[label] = float(np.percentile(values, LEAN_PERCENTILE)) if values.size else None
    for label, k, mask in _sections(inp):
        values = inp.image[k][mask]
        lean[label][k] = (float(np.percentile(values, LEAN_PERCENTILE)) if values.size >= inp.min_slice_voxels
                          else stack_lean[label])
    muscle_slices = [k for k in range(n) if np.isin(inp.labels[k], inp.muscles).any()]
    fat: list[float | None] = [None] * n
    for k in muscle_slices:
        fat[k] = subcutaneous_fat_reference(inp.image[k], inp.labels[k], inp.pixel_spacing_mm)
    seen = [v for v in fat if v is not None]
    missing = [k for k in muscle_slices if fat[k] is None]
    if missing:
        if seen:
            fill = float(np.median(seen))
            for k in missing:
                fat[k] = fill
            notes.append(f"{len(missing)} slice(s) without enough visible subcutaneous fat used the median "
                         "fat reference of the other slices")
        else:
            body = np.concatenate([inp.image[k][body_mask(inp.image[k])] for k in muscle_slices])
            fill = float(np.percentile(body, 95)) if body.size else None
            for k in missing:
                fat[k] = fill
            notes.append("no subcutaneous fat visible on any slice: fat reference = 95th percentile of the body "
                         "(less reliable: fluid is as bright as fat on T2)")
    return lean, fat, notes


def run_signal_fraction(inp: FatInput, share_of: Callable[[np.ndarray, float, float], np.ndarray] = linear_fat_share
                        ) -> FatResult:
    """The ``signal_fraction`` method; ``share_of`` = :func:`fat_signal_share` gives the diagnostic
    signal-weighted variant of ``tools/validate_fat.py``."""
    lean, fat, notes = signal_fraction_references(inp)
    result = FatResult(share=np.zeros(inp.image.shape, dtype=np.float32), lean_reference=lean,
                       fat_reference=fat, notes=notes)
    skipped = 0
    for label, k, mask in _sections(inp):
        lo, hi = lean[label][k], fat[k]
        if lo is None or hi is None or not hi > lo:
            skipped += 1
            continue
        result.share[k][mask] = share_of(inp.image[k][mask], lo, hi)
    if skipped:
        result.notes.append(f"{skipped} muscle section(s) had no usable references (fat not brighter than "
                            "muscle) and count as lean")
    return result


FAT_METHODS: dict[str, FatMethod] = {
    m.key: m for m in (
        FatMethod("otsu", "OTSU", "Otsu threshold within muscle", "classification", run_otsu),
        FatMethod("otsu_outlier", "OTSUOUTLIER", "Otsu threshold within muscle, outlier-corrected",
                  "classification", run_otsu_outlier),
        FatMethod("kmeans", "KMEANS2", "Two-class k-means within muscle", "classification", run_kmeans),
        FatMethod("gmm", "GMM2", "Two-component Gaussian mixture within muscle", "classification", run_gmm),
        FatMethod("signal_fraction", "FATSIGFRAC", "Fat-signal fraction, lean to subcutaneous fat",
                  "continuous", run_signal_fraction),
    )
}


def fat_method(key: str) -> FatMethod:
    """The registered method ``key``; ``ValueError`` naming the known keys otherwise."""
    try:
        return FAT_METHODS[key]
    except KeyError:
        raise ValueError(f"unknown fat method {key!r}; known: {', '.join(FAT_METHODS)}") from None


def separate_fat(image: np.ndarray, labels: np.ndarray, muscles: Sequence[int], method: str,
                 pixel_spacing_mm: tuple[float, float] = (1.0, 1.0),
                 min_slice_voxels: int = MIN_SLICE_VOXELS) -> FatResult:
    """Run method ``method`` on one stack (all ``muscles`` at once)."""
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
    inp = FatInput(np.asarray(image, dtype=np.float32), np.asarray(labels), tuple(int(m) for m in muscles),
                   (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])), int(min_slice_voxels))
    return fat_method(method).run(inp)


# --- bias field ------------------------------------------------------------------------------

def n4_bias_correct(image: np.ndarray, spacing_zyx_mm: tuple[float, float, float],
                    target_mm: float = 8.0, iterations: Sequence[int] = (50, 50)) -> np.ndarray:
    """N4 bias-field correction (SimpleITK) of a (slice, row, col) volume over the body.

    The field (N4's default B-spline of 4 control points per axis: smooth over the whole field of
    view) is fitted on a copy shrunk in-plane to about ``target_mm`` voxels, two resolution levels,
    and divided out at full resolution: about a second for a 256 x 256 x 8 stack and a few for
    400 x 400 x 29 on one CPU core. The mask is the body of each slice (:func:`body_mask`), so air does not steer it.
    Returns the corrected float32 volume (same scale on average over the body).
    """
    import SimpleITK as sitk

    volume = np.asarray(image, dtype=np.float32)
    mask = np.stack([body_mask(s) for s in volume]).astype(np.uint8)
    if mask.sum() < 100:
        return volume.copy()
    single = volume.shape[0] == 1  # one slice: fit in 2D (a 3D B-spline needs some depth)
    img = sitk.GetImageFromArray(volume[0] if single else volume)
    spacing = (float(spacing_zyx_mm[2]), float(spacing_zyx_mm[1]), float(spacing_zyx_mm[0]) or 1.0)
    img.SetSpacing(spacing[:2] if single else spacing)
    msk = sitk.GetImageFromArray(mask[0] if single else mask)
    msk.CopyInformation(img)
    shrink = [max(1, int(round(target_mm / float(spacing_zyx_mm[2])))),
              max(1, int(round(target_mm / float(spacing_zyx_mm[1])))), 1][:2 if single else 3]
    small, small_mask = sitk.Shrink(img, shrink), sitk.Shrink(msk, shrink)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)).astype(np.float32).reshape(volume.shape)
    corrected = volume / np.exp(log_field)
    # Keep the body's mean intensity: the field is defined up to a constant factor.
    inside = mask.astype(bool)
    scale = float(volume[inside].mean() / max(1e-6, corrected[inside].mean()))
    return (corrected * scale).astype(np.float32)
