"""Synthetic lumbar (and head) phantoms defined continuously in patient space.

Coordinates are DICOM patient LPS in mm: x towards the patient's left, y
posterior, z towards the head. The lumbar phantom is centred near the origin,
with the L3/L4 disc near z = 0; the patient's right side is negative x.

Anatomy is analytic (superellipses with smooth Fourier boundary perturbations)
and varies smoothly with z and with the seed, so any slice geometry (axial,
oblique, sagittal, flipped) can be rendered from the same truth. Rendered
volumes are indexed (slice, row, col) in the grid of a
:class:`~paraspinal.dicom_series_writer.StackGeometry`.

Muscle labels (fixed for the whole project): 0 background, 1 multifidus R,
2 multifidus L, 3 erector spinae R, 4 erector spinae L, 5 psoas major R,
6 psoas major L, 7 quadratus lumborum R, 8 quadratus lumborum L.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from paraspinal.dicom_series_writer import StackGeometry

__all__ = [
    "LABEL_NAMES",
    "MUSCLE_LABELS",
    "Tissue",
    "Rendering",
    "LumbarPhantom",
    "HeadPhantom",
    "fat_fractions_from_masks",
]

LABEL_NAMES: dict[int, str] = {
    1: "multifidus R", 2: "multifidus L",
    3: "erector spinae R", 4: "erector spinae L",
    5: "psoas major R", 6: "psoas major L",
    7: "quadratus lumborum R", 8: "quadratus lumborum L",
}
MUSCLE_LABELS: tuple[int, ...] = tuple(LABEL_NAMES)
_KIND_LABELS = {"multifidus": (1, 2), "erector_spinae": (3, 4), "psoas": (5, 6), "quadratus_lumborum": (7, 8)}
# Plausible default fat-fraction ranges (fraction, not %); paraspinal extensors infiltrate most.
_DEFAULT_FF_RANGE = {"multifidus": (0.08, 0.35), "erector_spinae": (0.06, 0.30),
                     "psoas": (0.03, 0.10), "quadratus_lumborum": (0.03, 0.15)}
DISC_NAMES = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")


class Tissue(IntEnum):
    """Tissue classes; each has a signal level per contrast."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    MARROW = 3  # cancellous bone
    CORTEX = 4  # cortical bone and ligament: dark on every sequence
    CSF = 5
    NUCLEUS = 6
    ANNULUS = 7
    VISCERA = 8
    VESSEL = 9  # flow void
    KIDNEY = 10
    GREY = 11
    WHITE = 12


# Signal (arbitrary units, written as uint16) per tissue. T2 TSE: fat and fluid
# bright, muscle dark, bone intermediate; T1: fat bright, fluid dark.
_SIGNAL = {
    "t2": {Tissue.AIR: 0, Tissue.FAT: 900, Tissue.MUSCLE: 200, Tissue.MARROW: 450, Tissue.CORTEX: 60,
           Tissue.CSF: 1100, Tissue.NUCLEUS: 800, Tissue.ANNULUS: 250, Tissue.VISCERA: 420, Tissue.VESSEL: 40,
           Tissue.KIDNEY: 560, Tissue.GREY: 520, Tissue.WHITE: 330},
    "t1": {Tissue.AIR: 0, Tissue.FAT: 1000, Tissue.MUSCLE: 350, Tissue.MARROW: 720, Tissue.CORTEX: 70,
           Tissue.CSF: 120, Tissue.NUCLEUS: 300, Tissue.ANNULUS: 280, Tissue.VISCERA: 430, Tissue.VESSEL: 50,
           Tissue.KIDNEY: 380, Tissue.GREY: 420, Tissue.WHITE: 560},
}


def _lut(contrast: str) -> np.ndarray:
    if contrast not in _SIGNAL:
        raise ValueError(f"contrast must be one of {sorted(_SIGNAL)}, got {contrast!r}")
    table = np.zeros(len(Tissue), dtype=np.float32)
    for tissue, value in _SIGNAL[contrast].items():
        table[tissue] = value
    return table


def fat_fractions_from_masks(labels: np.ndarray, fat_mask: np.ndarray) -> dict[int, float]:
    """Fat voxels / all voxels of each muscle label present in ``labels`` (fraction 0..1)."""
    counts = np.bincount(labels.ravel(), minlength=9)
    fat = np.bincount(labels.ravel(), weights=fat_mask.ravel().astype(np.float64), minlength=9)
    return {lab: float(fat[lab] / counts[lab]) for lab in MUSCLE_LABELS if counts[lab] > 0}


class Rendering(NamedTuple):
    """A rendered volume, (slice, row, col) in the geometry's grid; unpacks as (image, labels, fat_mask)."""

    image: np.ndarray  # float32, non-negative signal
    labels: np.ndarray  # uint8 muscle labels (0..8)
    fat_mask: np.ndarray  # bool, every fat voxel (subcutaneous, intermuscular and intramuscular)

    @property
    def fat_fractions(self) -> dict[int, float]:
        """TRUE fat fraction per muscle label, counted on the rendered voxels."""
        return fat_fractions_from_masks(self.labels, self.fat_mask)


def _superellipse(u: np.ndarray, v: np.ndarray, power: float) -> np.ndarray:
    """Normalised radius of (u, v) (already divided by the semi-axes): < 1 inside."""
    return (np.abs(u) ** power + np.abs(v) ** power) ** (1.0 / power)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


@dataclass(frozen=True)
class _Muscle:
    """Seeded parameters of one muscle; the shape itself is a function of z in :meth:`LumbarPhantom._shape`."""

    label: int
    kind: str
    side: float  # -1 patient right (negative x), +1 left
    size: float  # overall scale
    shift: tuple[float, float]  # mm, (lateral, posterior), in side-mirrored coordinates
    rotation: float  # rad, added to the kind's rotation
    harmonics: np.ndarray  # (3, 2): amplitude, phase of boundary harmonics k = 2, 3, 4
    target_ff: float
    waves: np.ndarray  # (K, 3) wave vectors of the fat field, rad/mm
    phases: np.ndarray  # (K,)


def _bias_field(points: np.ndarray, coeffs: np.ndarray, coil_y: float, strength: float) -> np.ndarray:
    """Smooth multiplicative field: posterior surface-coil fall-off plus slow random variation."""
    if strength <= 0:
        return np.ones(points.shape[:-1], dtype=np.float32)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    coil = (y - coil_y) / 120.0  # sensitivity rises towards the posterior (table) coil
    slow = sum(a * np.cos(kx * x + ky * y + kz * z + ph) for a, kx, ky, kz, ph in coeffs)
    return np.exp(strength * (0.7 * coil + 0.5 * slow)).astype(np.float32)


def _add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Rician noise: magnitude of the signal plus complex Gaussian noise of std ``sigma``."""
    if sigma <= 0:
        return image
    real = image + rng.normal(0.0, sigma, image.shape)
    imag = rng.normal(0.0, sigma, image.shape)
    return np.hypot(real, imag).astype(np.float32)


def _sample_offsets(supersample: int) -> np.ndarray:
    """In-plane sub-voxel offsets (row, col) in voxel units, centred on the voxel centre."""
    s = int(supersample)
    if s < 1:
        raise ValueError("supersample must be >= 1")
    o = (np.arange(s) + 0.5) / s - 0.5
    return np.array([(r, c) for r in o for c in o])


class _Renderer(ABC):
    """Shared rendering loop: sub-voxel sampling, partial volume, bias field and noise."""

    seed: int
    _bias_coeffs: np.ndarray  # see _random_bias_coeffs
    _coil_y: float  # LPS y (mm) of the receive coil, where the bias field peaks

    @abstractmethod
    def _classify(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels uint8, Tissue codes uint8) at LPS points (N, 3) in mm."""

    def render(self, geometry: StackGeometry, *, supersample: int = 1, noise_sigma: float = 10.0,
               bias_field_strength: float = 0.3, contrast: str = "t2", noise_seed: int | None = None) -> Rendering:
        """Render the phantom in the grid of ``geometry`` (which must know its rows and cols).

        ``supersample``: s x s in-plane samples per voxel whose signal the image
        averages (partial volume); labels and fat mask are the truth at the voxel
        centre whatever ``supersample`` is. ``noise_sigma``:
        std of the complex Gaussian noise behind the Rician magnitude noise (0: none),
        in signal units (muscle is 200 on T2). ``bias_field_strength``: amplitude (log
        scale) of the multiplicative bias field (0: none). ``contrast``: "t2" (T2 TSE)
        or "t1". Returns image, labels and fat mask indexed (slice, row, col).
        """
        return self.render_contrasts(geometry, (contrast,), supersample=supersample, noise_sigma=noise_sigma,
                                     bias_field_strength=bias_field_strength, noise_seed=noise_seed)[contrast]

    def render_contrasts(self, geometry: StackGeometry, contrasts: Sequence[str] = ("t2", "t1"), *, supersample: int = 1,
                         noise_sigma: float = 10.0, bias_field_strength: float = 0.3,
                         noise_seed: int | None = None) -> dict[str, Rendering]:
        """Like :meth:`render` for several contrasts of the same anatomy, classifying the points once."""
        if geometry.rows is None or geometry.cols is None:
            raise ValueError("geometry must carry rows and cols to be rendered")
        luts = {c: _lut(c) for c in contrasts}
        offsets = _sample_offsets(supersample)
        n, rows, cols = geometry.n_slices, geometry.rows, geometry.cols
        images = {c: np.zeros((n, rows, cols), dtype=np.float32) for c in contrasts}
        labels = np.zeros((n, rows, cols), dtype=np.uint8)
        fat = np.zeros((n, rows, cols), dtype=bool)
        r0, c0 = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
        for k in range(n):  # one slice at a time bounds memory for large matrices
            centres = geometry.index_to_lps(np.full(r0.shape, k), r0, c0)
            # Truth (labels, fat) is the continuous anatomy sampled at the voxel centre: a majority
            # vote over sub-samples would erode thin fat streaks and bias the fat fraction low.
            lab, centre_tissue = (a.reshape(r0.shape) for a in self._classify(centres.reshape(-1, 3)))
            labels[k] = lab
            fat[k] = centre_tissue == Tissue.FAT
            if len(offsets) == 1:
                tis = centre_tissue[..., None]
            else:  # the image integrates the signal over the voxel (partial volume)
                rr = r0[..., None] + offsets[:, 0]
                cc = c0[..., None] + offsets[:, 1]
                pts = geometry.index_to_lps(np.full(rr.shape, k), rr, cc)  # (rows, cols, s*s, 3)
                tis = self._classify(pts.reshape(-1, 3))[1].reshape(rr.shape)
            bias = _bias_field(centres, self._bias_coeffs, self._coil_y, bias_field_strength)
            for c in contrasts:
                images[c][k] = luts[c][tis].mean(axis=-1) * bias
        base = noise_seed if noise_seed is not None else self.seed + 7919
        out = {}
        for i, c in enumerate(contrasts):
            image = _add_noise(images[c], noise_sigma, np.random.default_rng(base + 1000 * i))
            out[c] = Rendering(image.astype(np.float32), labels, fat)
        return out


def _random_bias_coeffs(rng: np.random.Generator, n: int = 4) -> np.ndarray:
    """Random slow cosines (wavelengths 250..600 mm) for the bias field."""
    out = []
    for _ in range(n):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * np.pi / rng.uniform(250, 600) * direction
        out.append((rng.uniform(0.2, 0.5), *k, rng.uniform(0, 2 * np.pi)))
    return np.array(out)


class LumbarPhantom(_Renderer):
    """Analytic lumbar axial anatomy (L1 to S1) with eight labelled muscles and intramuscular fat.

    ``seed`` fixes habitus, muscle sizes, asymmetry, shapes, fat patterns and
    (unless given) the target fat fractions. ``fat_fractions``: a fraction 0..0.9
    for every muscle, or a mapping label -> fraction (missing labels drawn).
    ``fat_pattern_wavelength_mm``: typical in-plane size of fat streaks.
    """

    #: z step (mm) of the per-muscle fat threshold table (see :meth:`_fat_threshold`).
    _Z_STEP = 4.0
    _LATTICE_MM = 1.0

    def __init__(self, seed: int = 0, fat_fractions: float | Mapping[int, float] | None = None, *,
                 fat_pattern_wavelength_mm: tuple[float, float] = (3.5, 10.0), n_fat_waves: int = 24) -> None:
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        # Habitus: body outline (superellipse) and subcutaneous fat thickness.
        self.body_half_width = rng.uniform(140, 180)
        self.body_half_depth = rng.uniform(105, 130)
        fatness = rng.uniform(0, 1)
        self.fat_posterior = 10 + 25 * fatness
        self.fat_lateral = 10 + 30 * fatness + rng.uniform(-3, 3)
        self.fat_anterior = 10 + 30 * fatness + rng.uniform(-3, 3)
        # Spine: vertebral body centre y, lordosis depth, size, disc levels.
        self.spine_y0 = rng.uniform(25, 32)
        self.lordosis = rng.uniform(3, 9)
        self.spine_scale = rng.uniform(0.92, 1.08)
        self.level_height = rng.uniform(34, 38)
        self.z_l34 = rng.normal(0, 3)
        self.disc_z = np.array([self.z_l34 + (2 - i) * self.level_height for i in range(5)])
        self.disc_half = np.array([4.0, 4.3, 4.6, 4.9, 4.6]) * rng.uniform(0.9, 1.1)
        self._coil_y = self.spine_y0 + 90
        self._bias_coeffs = _random_bias_coeffs(rng)
        # Muscles.
        kind_size = {kind: rng.uniform(0.88, 1.12) for kind in _KIND_LABELS}
        if fat_fractions is None:
            fat_fractions = {}
        if not isinstance(fat_fractions, Mapping):
            fat_fractions = {lab: float(fat_fractions) for lab in MUSCLE_LABELS}
        self._muscles: list[_Muscle] = []
        lo_wl, hi_wl = fat_pattern_wavelength_mm
        for kind, (lab_r, lab_l) in _KIND_LABELS.items():
            base_ff = rng.uniform(*_DEFAULT_FF_RANGE[kind])
            for lab, side in ((lab_r, -1.0), (lab_l, 1.0)):
                drawn_ff = float(np.clip(base_ff * rng.uniform(0.85, 1.15), 0.0, 0.9))
                ff = float(fat_fractions.get(lab, drawn_ff))
                if not 0.0 <= ff <= 0.9:
                    raise ValueError(f"fat fraction of label {lab} must be within 0..0.9, got {ff}")
                theta = rng.uniform(0, np.pi, n_fat_waves)
                lam = rng.uniform(lo_wl, hi_wl, n_fat_waves)
                lam_z = rng.uniform(40, 120, n_fat_waves) * rng.choice([-1, 1], n_fat_waves)
                # Streaks: short in-plane wavelengths, long along z (fibres run cranio-caudally).
                waves = 2 * np.pi * np.stack([np.cos(theta) / lam, np.sin(theta) / lam, 1 / lam_z], axis=1)
                harmonics = np.stack([rng.uniform(0, [0.06, 0.05, 0.03]), rng.uniform(0, 2 * np.pi, 3)], axis=1)
                self._muscles.append(_Muscle(
                    label=lab, kind=kind, side=side, size=kind_size[kind] * rng.uniform(0.93, 1.07),
                    shift=(rng.normal(0, 1.2), rng.normal(0, 1.2)), rotation=np.deg2rad(rng.normal(0, 4)),
                    harmonics=harmonics, target_ff=ff, waves=waves, phases=rng.uniform(0, 2 * np.pi, n_fat_waves)))
        self._tau_cache: dict[int, np.ndarray] = {}

    # ----------------------------------------------------------------- public helpers
    @property
    def target_fat_fractions(self) -> dict[int, float]:
        """Target fat fraction (0..1) of each muscle label."""
        return {m.label: m.target_ff for m in self._muscles}

    @property
    def z_range(self) -> tuple[float, float]:
        """z (mm) from the S1 endplate region to mid-L1: where the anatomy is meaningful."""
        return float(self.disc_z[4] - 0.6 * self.level_height), float(self.disc_z[0] + 0.6 * self.level_height)

    def spine_y(self, z: np.ndarray | float) -> np.ndarray:
        """LPS y (mm) of the vertebral body centre at height z: lordosis brings mid-lumbar levels forward."""
        t = np.clip((np.asarray(z, dtype=np.float64) - self.z_l34) / (2.6 * self.level_height), -1, 1)
        return self.spine_y0 - self.lordosis * np.cos(0.5 * np.pi * t)

    def disc_centres(self) -> dict[str, np.ndarray]:
        """LPS mm of the centre of each lumbar disc (L1/L2 .. L5/S1)."""
        return {name: np.array([0.0, float(self.spine_y(z)), float(z)]) for name, z in zip(DISC_NAMES, self.disc_z)}

    def level_z_ranges(self) -> dict[str, tuple[float, float]]:
        """(z low, z high) mm of each disc (L1/L2 .. L5/S1) and vertebral body (L1 .. S1) of the
        phantom, as :meth:`spine_levels_at` labels them: a disc is its vertebral-body outline within
        its half-height of the disc centre; a body fills the space between two discs (L1 up to one
        level height above L1/L2 less a disc half-height, S1 down to the bottom of :attr:`z_range`)."""
        discs = {name: (float(z - h), float(z + h)) for name, z, h in zip(DISC_NAMES, self.disc_z, self.disc_half)}
        names = [n.split("/")[0] for n in DISC_NAMES] + ["S1"]  # L1 .. L5, S1: the body above each disc, then S1
        tops = [float(self.disc_z[0] + self.level_height - self.disc_half[0])] + [discs[n][0] for n in DISC_NAMES]
        bottoms = [discs[n][1] for n in DISC_NAMES] + [self.z_range[0]]
        bodies = {name: (bottom, top) for name, top, bottom in zip(names, tops, bottoms)}
        return {**discs, **bodies}

    def spine_levels_at(self, points_lps: np.ndarray) -> list[str | None]:
        """The disc ("L4/L5") or vertebral body ("L4") at each LPS point (N, 3), ``None`` elsewhere
        (posterior elements, canal and soft tissue are not labelled); see :meth:`level_z_ranges`."""
        pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        w, d = self._vertebra(self._caudal(z))
        in_body_outline = _superellipse(x / w, (y - self.spine_y(z)) / d, 2.5) < 1
        ranges = self.level_z_ranges()
        names = sorted(ranges, key=lambda n: "/" in n)  # bodies first: a disc wins where a range touches it
        index = np.full(len(pts), -1)
        for i, name in enumerate(names):
            lo, hi = ranges[name]
            index[in_body_outline & (z >= lo) & (z < hi)] = i
        return [names[i] if i >= 0 else None for i in index]

    def labels_at(self, points_lps: np.ndarray) -> np.ndarray:
        """Muscle label (uint8, 0..8) at each LPS point (N, 3) in mm."""
        return self._classify(np.asarray(points_lps, dtype=np.float64).reshape(-1, 3))[0]

    def tissue_at(self, points_lps: np.ndarray) -> np.ndarray:
        """:class:`Tissue` code (uint8) at each LPS point (N, 3) in mm; intramuscular fat is FAT."""
        return self._classify(np.asarray(points_lps, dtype=np.float64).reshape(-1, 3))[1]

    # ----------------------------------------------------------------- anatomy
    def _mean_size(self, kind: str) -> float:
        """Mean size factor of a muscle kind (both sides), used to place neighbours next to it."""
        return float(np.mean([m.size for m in self._muscles if m.kind == kind]))

    def _caudal(self, z: np.ndarray) -> np.ndarray:
        """0 at mid-L1 (cranial) .. 1 at the L5/S1 disc (caudal)."""
        top = self.disc_z[0] + 0.5 * self.level_height
        return np.clip((top - z) / (top - self.disc_z[4]), 0.0, 1.0)

    def _vertebra(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vertebral body half-width and half-depth (mm); bodies widen caudally."""
        return (22 + 5 * s) * self.spine_scale, (16 + 2 * s) * self.spine_scale

    def _shape(self, m: _Muscle, s: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, ...]:
        """(cx, cy, ax, ay, angle, power) of muscle ``m``; cx in side-mirrored x (medial 0, lateral +)."""
        w, d = self._vertebra(s)
        mf_ax = (10 + 5 * s) * self._mean_size("multifidus")
        # Semi-axes (mm) chosen so cross-sections match published sizes: erector spinae
        # ~15 cm2, multifidus 5-9 cm2 (largest caudally), psoas 2-13 cm2 (growing caudally).
        if m.kind == "multifidus":  # beside the spinous process; larger caudally
            ax, ay = 10 + 5 * s, 16 + 4 * s
            cx, cy, ang, p = 5 + ax * m.size, yc + d + 40, np.deg2rad(10), 2.4
        elif m.kind == "erector_spinae":  # lateral to multifidus; smaller caudally
            ax, ay = 30 - 6 * s, 20 - 3 * s
            cx, cy, ang, p = 5 + 2 * mf_ax - 2 + ax * m.size, yc + d + 36, np.deg2rad(-20), 2.2
        elif m.kind == "quadratus_lumborum":  # lateral to the transverse process tips; shrinks caudally
            q = 1 - 0.6 * s
            ax, ay = 4 + 12 * q, 3 + 5 * q
            cx, cy, ang, p = 62 + 6 * q, yc + d + 8, np.deg2rad(-30), 2.0
        else:  # psoas: antero-lateral to the vertebral body; grows caudally
            ax, ay = 7 + 16 * s, 7 + 11 * s
            cx, cy, ang, p = w + 0.85 * ax * m.size, yc - 2 - 4 * s, np.deg2rad(-30), 2.0
        cx = cx + m.shift[0]
        cy = cy + m.shift[1]
        # Shapes live in side-mirrored coordinates, so one angle describes both sides.
        return cx, cy, ax * m.size, ay * m.size, ang + m.rotation, p

    def _muscle_coords(self, m: _Muscle, pts: np.ndarray, s: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inside mask, normalised radius 0 centre .. 1 boundary) of muscle ``m`` at ``pts``."""
        cx, cy, ax, ay, ang, p = self._shape(m, s, yc)
        du = m.side * pts[:, 0] - cx  # mirrored: medial 0, lateral positive on both sides
        dv = pts[:, 1] - cy
        ca, sa = np.cos(ang), np.sin(ang)
        u = (ca * du + sa * dv) / ax
        v = (-sa * du + ca * dv) / ay
        rho = _superellipse(u, v, p)
        phi = np.arctan2(v, u)
        boundary = 1.0 + sum(a * np.cos((k + 2) * phi + ph) for k, (a, ph) in enumerate(m.harmonics))
        rho_n = rho / boundary
        return rho_n < 1.0, rho_n

    def _fat_field(self, m: _Muscle, pts: np.ndarray, rho_n: np.ndarray) -> np.ndarray:
        """Smooth random field (~N(0,1)) plus a rise towards the muscle boundary, where fat collects."""
        phase = pts @ m.waves.T + m.phases
        field = np.sqrt(2.0 / len(m.phases)) * np.cos(phase).sum(axis=1)
        return field + 1.2 * rho_n

    def _fat_threshold(self, m: _Muscle, z: np.ndarray) -> np.ndarray:
        """Threshold of the fat field at height z so that the target fraction of the muscle's cross-section is fat.

        Calibrated once per z node (every ``_Z_STEP`` mm) on a fine lattice of the
        axial cross-section and interpolated, so the fraction holds in every slab,
        independently of the grid later rendered.
        """
        if m.target_ff <= 0:
            return np.full(z.shape, np.inf)
        nodes = np.floor(z / self._Z_STEP).astype(np.int64)
        lo, hi = int(nodes.min()), int(nodes.max()) + 1
        taus = np.array([self._tau_node(i)[m.label] for i in range(lo, hi + 1)])
        f = z / self._Z_STEP - nodes
        idx = nodes - lo
        return (1 - f) * taus[idx] + f * taus[idx + 1]

    def _tau_node(self, node: int) -> np.ndarray:
        """Fat-field thresholds of every label (index = label) on the axial plane z = node * _Z_STEP."""
        if node not in self._tau_cache:
            z = node * self._Z_STEP
            yc = float(self.spine_y(z))
            # A lattice covering every muscle (their extents stay within these bounds for all seeds).
            gx, gy = np.meshgrid(np.arange(-110.0, 110.0, self._LATTICE_MM),
                                 np.arange(yc - 40.0, yc + 100.0, self._LATTICE_MM), indexing="ij")
            pts = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, z)], axis=1)
            # The calibration sees each muscle as rendered: minus the bone and neighbours that clip it.
            labels, _ = self._classify(pts, with_fat=False)
            taus = np.full(9, np.inf)
            for m in self._muscles:
                inside = labels == m.label
                if m.target_ff > 0 and inside.any():
                    n_in = int(inside.sum())
                    _, rho_n = self._muscle_coords(m, pts[inside], np.repeat(self._caudal(np.array([z])), n_in),
                                                   np.full(n_in, yc))
                    taus[m.label] = float(np.quantile(self._fat_field(m, pts[inside], rho_n), 1.0 - m.target_ff))
            self._tau_cache[node] = taus
        return self._tau_cache[node]

    def _classify(self, pts: np.ndarray, with_fat: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(labels uint8, tissue uint8) at LPS points (N, 3)."""
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        n = len(pts)
        labels = np.zeros(n, dtype=np.uint8)
        tissue = np.full(n, Tissue.AIR, dtype=np.uint8)
        s = self._caudal(z)
        yc = self.spine_y(z)
        w, d = self._vertebra(s)

        # Body outline and subcutaneous fat (superellipse: flatter than an ellipse, like a trunk).
        y_post = self.spine_y0 + 16 + 72 + self.fat_posterior
        yb, bd = y_post - self.body_half_depth, self.body_half_depth
        body = _superellipse(x / self.body_half_width, (y - yb) / bd, 2.3) < 1
        in_front, in_back = yb - bd + self.fat_anterior, y_post - self.fat_posterior
        yi, bi = (in_front + in_back) / 2, (in_back - in_front) / 2
        ai = self.body_half_width - self.fat_lateral
        rho_inner = _superellipse(x / ai, (y - yi) / bi, 2.3)
        inner = rho_inner < 1
        tissue[body] = Tissue.FAT
        # Deep compartment: viscera in front, retroperitoneal / intermuscular fat behind.
        viscera = inner & (y < yc - d - 8 - 0.25 * np.abs(x))
        tissue[viscera] = Tissue.VISCERA
        wall = inner & (_superellipse(x / (ai - 9), (y - yi) / (bi - 9), 2.3) >= 1) & (y < yc + 10)
        tissue[wall] = Tissue.MUSCLE  # abdominal wall: muscle signal, not a labelled muscle
        kidney_z = _smoothstep((0.55 - s) / 0.15)
        kidney = inner & (kidney_z > 0) & (_superellipse((np.abs(x) - 85) / (24 * kidney_z + 1e-6), (y - yc - 2) / (13 * kidney_z + 1e-6), 2) < 1)
        tissue[kidney] = Tissue.KIDNEY
        below_bif = z < self.disc_z[3] + 8  # aortic bifurcation near L4
        aorta = inner & ~below_bif & (np.hypot(x - 10, y - (yc - d - 12)) < 9)
        ivc = inner & ~below_bif & (_superellipse((x + 17) / 11, (y - (yc - d - 10)) / 7, 2) < 1)
        split = np.clip(self.disc_z[3] + 8 - z, 0, None) * 0.35
        iliacs = inner & below_bif & ((np.hypot(np.abs(x) - 12 - split, y - (yc - d - 10)) < 5.5))
        tissue[aorta | ivc | iliacs] = Tissue.VESSEL

        # Muscles; earlier entries win overlaps (medial before lateral). Bone is drawn afterwards, on top.
        muscle_rho = {}
        for m in sorted(self._muscles, key=lambda mm: ("multifidus", "erector_spinae", "quadratus_lumborum", "psoas").index(mm.kind)):
            idx = np.flatnonzero(inner & (labels == 0))
            # Cheap bounding-circle test first (superellipse corners and harmonics stay within 1.3 x the
            # larger semi-axis), so the costly boundary evaluation runs on few points.
            cx, cy, ax, ay, _, _ = self._shape(m, s[idx], yc[idx])
            reach = 1.3 * np.maximum(ax, ay)
            idx = idx[(m.side * x[idx] - cx) ** 2 + (y[idx] - cy) ** 2 < reach * reach]
            if idx.size == 0:
                continue
            inside, rho_n = self._muscle_coords(m, pts[idx], s[idx], yc[idx])
            hit = idx[inside]
            labels[hit] = m.label
            tissue[hit] = Tissue.MUSCLE
            muscle_rho[m.label] = (hit, rho_n[inside])

        # Spine: vertebral body or disc, canal, posterior arch, transverse processes.
        dz = np.abs(z[:, None] - self.disc_z[None, :])
        nearest = dz.argmin(axis=1)
        in_disc = dz[np.arange(n), nearest] < self.disc_half[nearest]
        level_mid = np.abs(z[:, None] - (self.disc_z[None, :] - 0.5 * self.level_height)).min(axis=1) < 0.22 * self.level_height
        rho_vb = _superellipse(x / w, (y - yc) / d, 2.5)
        vb = rho_vb < 1
        canal_y = yc + d + 9 * self.spine_scale
        canal = _superellipse(x / (10 + s), (y - canal_y) / 7, 2.0) < 1
        arch = (_superellipse(x / 16, (y - canal_y) / 12, 2.0) < 1) & ~canal & (y > canal_y - 3)
        pedicles = level_mid & (np.abs(np.abs(x) - 12) < 4) & (y > yc + d - 2) & (y < canal_y + 2)
        facets = ~level_mid & (np.hypot(np.abs(x) - 15, y - canal_y - 7) < 6)
        spinous = (np.abs(x) < 3.5 * self.spine_scale) & (y > canal_y + 8) & (y < yc + d + 58)
        transverse = level_mid & (np.abs(x) > w - 6) & (np.abs(x) < 44 + 4 * (1 - s)) & (np.abs(y - canal_y + 3) < 4)
        bone = (vb & ~in_disc) | arch | pedicles | facets | (spinous & ~in_disc) | transverse
        rim = vb & ~in_disc & (rho_vb > 1 - 1.5 / w)
        tissue[bone] = Tissue.MARROW
        tissue[rim | (spinous & in_disc)] = Tissue.CORTEX  # cortex; interspinous ligament at disc levels
        disc = vb & in_disc
        tissue[disc] = Tissue.ANNULUS
        tissue[disc & (_superellipse(x / (0.55 * w), (y - yc) / (0.5 * d), 2.0) < 1)] = Tissue.NUCLEUS
        tissue[canal] = Tissue.CSF
        labels[bone | disc | canal | (spinous & in_disc)] = 0

        # Intramuscular fat: threshold a smooth random field, calibrated per z to each target fraction.
        if with_fat:
            for m in self._muscles:
                if m.label not in muscle_rho:
                    continue
                hit, rho_n = muscle_rho[m.label]
                keep = labels[hit] == m.label
                hit, rho_n = hit[keep], rho_n[keep]
                if hit.size == 0:
                    continue
                fat = self._fat_field(m, pts[hit], rho_n) > self._fat_threshold(m, z[hit])
                tissue[hit[fat]] = Tissue.FAT
        return labels, tissue


class HeadPhantom(_Renderer):
    """A roughly head-shaped phantom (scalp fat, skull, CSF, grey and white matter, ventricles).

    Centred at the LPS origin; about 150 mm wide (x) and 190 mm deep (y). No
    labels: it exists to test that a brain study is rejected.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self.half_width = rng.uniform(70, 80)
        self.half_depth = rng.uniform(88, 98)
        self.half_height = rng.uniform(85, 100)
        self._coil_y = 0.0
        self._bias_coeffs = _random_bias_coeffs(rng)

    def _classify(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        shrink = np.sqrt(np.clip(1 - (z / self.half_height) ** 2, 0, 1))  # dome towards the vertex
        a, b = self.half_width * shrink + 1e-6, self.half_depth * shrink + 1e-6
        tissue = np.full(len(pts), Tissue.AIR, dtype=np.uint8)
        for depth, value in ((0, Tissue.FAT), (5, Tissue.CORTEX), (11, Tissue.CSF), (13, Tissue.GREY), (17, Tissue.WHITE)):
            tissue[_superellipse(x / np.maximum(a - depth, 1e-6), y / np.maximum(b - depth, 1e-6), 2.0) < 1] = value
        ventricles = (np.abs(z - 10) < 25) & (_superellipse((np.abs(x) - 9) / 6, (y + 5) / 28, 2.0) < 1)
        tissue[ventricles] = Tissue.CSF
        return np.zeros(len(pts), dtype=np.uint8), tissue
