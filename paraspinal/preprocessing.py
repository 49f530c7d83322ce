"""Putting a volume into the model's space and mapping predictions back.

The model space is defined by the bundle's :class:`PreprocessingSpec`: the volume is
reoriented to ``orientation`` (RAS by default: voxel axis 0 increases towards the
patient's right, axis 1 anterior, axis 2 superior), resampled in-plane to ``pixdim_mm`` (the slice axis
keeps its spacing, so no interpolation between slices), and z-scored over its non-zero
voxels. Training and inference share these transforms, so what the network sees is
identical in both.

Volumes travel as MONAI ``MetaTensor`` with shape (C, I, J, K) and a RAS ``affine``
(MONAI's world convention); DICOM LPS geometry is converted at the boundary
(:func:`lps_affine_to_ras`).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, NormalizeIntensityd, Orientationd, Spacingd

from paraspinal.model_bundle import PreprocessingSpec

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_affine_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert a voxel-to-patient affine from DICOM LPS to RAS (MONAI/NIfTI world)."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


def as_metatensor(volume: np.ndarray, affine_ras: np.ndarray) -> MetaTensor:
    """Wrap a (I, J, K) array with its RAS affine as a channel-first MetaTensor (1, I, J, K)."""
    data = torch.as_tensor(np.ascontiguousarray(volume, dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.as_tensor(affine_ras, dtype=torch.float64))


def model_space_transforms(spec: PreprocessingSpec, keys: tuple[str, ...] = ("image",),
                           label_keys: tuple[str, ...] = (), raw_keys: tuple[str, ...] = ()) -> Compose:
    """Invertible transforms from a source volume to the model space.

    ``keys`` are intensity images (bilinear, z-scored); ``label_keys`` are label maps
    (nearest neighbour, not normalised); ``raw_keys`` are intensity images resampled like
    ``keys`` but left in their own units (training mixes Dixon water and fat from them).
    Spacing keeps the slice axis (non-positive pixdim).
    """
    all_keys = tuple(keys) + tuple(raw_keys) + tuple(label_keys)
    modes = ["bilinear"] * (len(keys) + len(raw_keys)) + ["nearest"] * len(label_keys)
    return Compose(
        [
            Orientationd(keys=all_keys, axcodes=spec.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=all_keys, pixdim=(spec.pixdim_mm[0], spec.pixdim_mm[1], -1.0), mode=modes),
            NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True),
        ]
    )


def with_neighbour_slices(volume: torch.Tensor, context_slices: int) -> torch.Tensor:
    """2.5D input: (1, I, J, K) -> (1 + 2n, I, J, K), channel c holding slice k + c - n.

    Slices run along voxel axis 2 of the model space (inferior -> superior in RAS). Past
    either end the edge slice is repeated, so the first and last slices see themselves as
    their missing neighbour rather than an empty image the network never saw in training.
    Metadata (affine, applied operations) is kept when ``volume`` is a MetaTensor.
    """
    if context_slices <= 0:
        return volume
    if volume.shape[0] != 1:
        raise ValueError(f"expected one channel, got {volume.shape[0]}")
    k = volume.shape[-1]
    index = torch.arange(k)
    channels = [volume[0][..., (index + offset).clamp(0, k - 1)]
                for offset in range(-context_slices, context_slices + 1)]
    return torch.stack(channels, dim=0)
