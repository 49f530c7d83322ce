"""Synthetic training volumes from the analytic lumbar phantom (:mod:`paraspinal.phantom`).

Each phantom (own seed: habitus, muscle sizes, fat infiltration) is rendered as an axial
stack with randomised acquisition: field of view 220-380 mm, in-plane spacing 0.6-1.1 mm,
slice spacing 3.5-5.5 mm, tilt about the left-right axis +-12 deg, noise, bias field and
contrast (T2 TSE in 3 of 4 volumes, T1 otherwise, so the network does not lean on one
tissue-contrast table). All 8 muscles are labelled, so every class is supervised.

The phantom renders (slice, row, col) in DICOM LPS geometry; it is turned into the (I, J, K)
= (col, row, slice) NIfTI-style array with a RAS affine exactly as the application turns a
DICOM stack into a volume (``paraspinal.segmentation.to_model_space``), and then goes
through the shared preprocessing like a real case. Renders are cached as .npz files
(``output/synthetic_cache``) because rendering costs seconds per volume.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from paraspinal.preprocessing import lps_affine_to_ras
from training.data import PROJECT_ROOT, LoadedCase
from training.labels import ALL_CLASSES

CACHE_DIR = PROJECT_ROOT / "output" / "synthetic_cache"
RENDER_VERSION = 1  # bump when the acquisition randomisation below changes


def render_synthetic_case(index: int, seed: int = 0) -> LoadedCase:
    """Render synthetic volume ``index`` of run ``seed`` (deterministic in both)."""
    from paraspinal.dicom_series_writer import axial_stack_geometry
    from paraspinal.phantom import LumbarPhantom

    rng = np.random.default_rng([seed, index, 7])
    phantom_seed = 10_000 + 1000 * seed + index
    phantom = LumbarPhantom(seed=phantom_seed)
    fov = rng.uniform(220.0, 380.0)
    spacing = rng.uniform(0.6, 1.1)
    size = int(round(fov / spacing))
    slice_spacing = rng.uniform(3.5, 5.5)
    z_lo, z_hi = phantom.z_range
    n_slices = int(np.clip(rng.integers(12, 25), 3, int((z_hi - z_lo) / slice_spacing)))
    z_centre = rng.uniform(z_lo + 0.5 * n_slices * slice_spacing, z_hi - 0.5 * n_slices * slice_spacing)
    # Centre the field of view a little behind the vertebral body, where the muscles are,
    # with some random offset (technologists do not centre exactly).
    centre = (rng.normal(0.0, 8.0), phantom.spine_y0 + 30.0 + rng.normal(0.0, 10.0), z_centre)
    geometry = axial_stack_geometry(n_slices, size, size, (spacing, spacing), slice_spacing, origin_lps=centre,
                                    tilt_deg_about_lr=rng.uniform(-12.0, 12.0))
    contrast = "t2" if rng.random() < 0.75 else "t1"
    rendering = phantom.render(geometry, contrast=contrast, noise_sigma=rng.uniform(4.0, 25.0),
                               bias_field_strength=rng.uniform(0.0, 0.5), noise_seed=phantom_seed + 1)
    image = rendering.image.transpose(2, 1, 0).astype(np.float32)  # (slice,row,col) -> (col,row,slice) = (I,J,K)
    label = rendering.labels.transpose(2, 1, 0).astype(np.uint8)
    affine = lps_affine_to_ras(geometry.affine_lps())
    source = (f"phantom seed {phantom_seed}, {contrast.upper()}, {n_slices} slices, {spacing:.2f} mm in-plane, "
              f"{slice_spacing:.1f} mm slices")
    return LoadedCase(f"synthetic_{seed}_{index:03d}", image, label, affine, ALL_CLASSES, source)


def _cache_path(index: int, seed: int) -> Path:
    phantom_code = (PROJECT_ROOT / "paraspinal" / "phantom.py").read_bytes()
    digest = hashlib.sha256(phantom_code + str(RENDER_VERSION).encode()).hexdigest()[:12]
    return CACHE_DIR / f"synthetic_s{seed}_{index:03d}_{digest}.npz"


def synthetic_case(index: int, seed: int = 0, use_cache: bool = True) -> LoadedCase:
    """A synthetic case, from the cache when the phantom code has not changed since it was rendered."""
    path = _cache_path(index, seed)
    if use_cache and path.is_file():
        with np.load(path, allow_pickle=False) as npz:
            return LoadedCase(str(npz["case_id"]), npz["image"], npz["label"], npz["affine"], ALL_CLASSES,
                              str(npz["source"]))
    case = render_synthetic_case(index, seed)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name of its own per writer: two trainings started together render the same case, and a
        # shared name let one move the other's file away before it was renamed (FileNotFoundError).
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp.npz")
        os.close(handle)
        tmp = Path(tmp_name)
        try:
            np.savez_compressed(tmp, case_id=case.case_id, image=case.image, label=case.label,
                                affine=case.affine_ras, source=case.source)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return case


def synthetic_cases(count: int, seed: int = 0, use_cache: bool = True) -> list[LoadedCase]:
    """``count`` synthetic cases of run ``seed``."""
    return [synthetic_case(i, seed, use_cache) for i in range(count)]
