"""Training-time transforms on 2D model-space slices (1, I, J), axis 0 = patient right (RAS).

The slices are already in the model space (shared preprocessing, z-scored over the
non-zero voxels of their volume); what is added here is what the application does not do:
padding/cropping to the 256x256 window, geometric augmentation and, optionally, contrast
augmentation.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrast,
    RandAffined,
    RandBiasField,
    RandCropByPosNegLabeld,
    RandHistogramShift,
    Randomizable,
    RandomizableTransform,
)

from training.labels import SIDE_SWAP

AUGMENTATIONS = ("none", "contrast")


class RandPadToWindowd(RandomizableTransform, MapTransform):
    """Pad image and label to at least ``roi`` (centred), like the inferer pads small slices.

    The application's inferer pads with the volume minimum (``pad_value`` of the item);
    MONAI's default is 0. Either is drawn with probability 1/2 so the network sees both.
    Labels are padded with 0.
    """

    def __init__(self, keys: KeysCollection, label_key: str, roi: tuple[int, int]):
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        self.roi = roi

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        use_min = self.R.rand() < 0.5
        for key in self.keys:
            x = torch.as_tensor(d[key])
            pads = []
            for axis, size in zip((2, 1), (self.roi[1], self.roi[0])):  # F.pad order: last dim first
                missing = max(0, size - x.shape[axis])
                pads += [missing // 2, missing - missing // 2]
            if any(pads):
                value = 0.0 if key == self.label_key or not use_min else float(d.get("pad_value", 0.0))
                x = torch.nn.functional.pad(x, pads, mode="constant", value=value)
            d[key] = x
        return d


class RandFlipLeftRightd(RandomizableTransform, MapTransform):
    """Mirror along voxel axis 0 (patient right-left) and swap the R/L labels.

    Mirroring changes which side of the patient a muscle is on, so a plain flip would teach
    the wrong side; with the swap the image and labels stay consistent (the muscle at larger
    axis-0 index, i.e. further right, is still the "right" one).
    """

    def __init__(self, image_key: str, label_key: str, prob: float = 0.5):
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, (image_key, label_key))
        self.image_key = image_key
        self.label_key = label_key
        lut = torch.arange(max(SIDE_SWAP) + 1)
        for source, target in SIDE_SWAP.items():
            lut[source] = target
        self.lut = lut

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        d[self.image_key] = torch.flip(torch.as_tensor(d[self.image_key]), dims=(1,))
        label = torch.flip(torch.as_tensor(d[self.label_key]), dims=(1,))
        d[self.label_key] = self.lut[label.long()].to(label.dtype)
        return d


class RandContrastd(RandomizableTransform, MapTransform):
    """Contrast augmentation for a contrast-agnostic network, on z-scored slices.

    Works on the foreground (non-zero voxels; the background the z-score left at 0 stays 0):

    1. background masking (p=0.25): voxels below a random low quantile are set to 0 and the
       rest re-z-scored, as when a scanner or Dixon reconstruction masks the background
       (MyoSegmenTUM) instead of keeping its noise (MuscleMap); this changes the z-score;
    2. non-linear intensity changes on the foreground rescaled to [0, 1]: bias field
       (p=0.5), gamma 0.6-1.6 (p=0.5), histogram shift (p=0.3); the slice mean/std are then
       restored, because the inference z-score removes any global scale and shift;
    3. linear foreground scale 0.85-1.15 and shift +-0.2 SD (p=0.5): a global change would be
       undone by the z-score, but the z-score itself varies with what the field of view
       holds (air, fat, arms), which this imitates;
    4. Gaussian noise 0.05 SD (p=0.2).
    """

    def __init__(self, keys: KeysCollection):
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys)
        self.bias = RandBiasField(degree=3, coeff_range=(0.0, 0.3), prob=0.5)
        self.gamma = RandAdjustContrast(prob=0.5, gamma=(0.6, 1.6))
        self.histogram = RandHistogramShift(num_control_points=(5, 10), prob=0.3)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "RandContrastd":
        super().set_random_state(seed, state)
        for sub in (self.bias, self.gamma, self.histogram):
            sub.set_random_state(state=self.R)
        return self

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clone()
        fg = x != 0
        if int(fg.sum()) < 16:
            return x
        if self.R.rand() < 0.25:
            q = float(np.quantile(x[fg].numpy(), self.R.uniform(0.05, 0.35)))
            fg = fg & (x >= q)
            x = torch.where(fg, x, torch.zeros_like(x))
            vals = x[fg]
            x[fg] = (vals - vals.mean()) / vals.std().clamp_min(1e-6)
        vals = x[fg]
        mean, std = vals.mean(), vals.std().clamp_min(1e-6)
        lo, hi = vals.min(), vals.max()
        y = torch.where(fg, (x - lo) / (hi - lo).clamp_min(1e-6), torch.zeros_like(x))
        y = torch.as_tensor(self.bias(y)).float()
        y = torch.as_tensor(self.gamma(y.clamp_min(0))).float()
        y = torch.as_tensor(self.histogram(y)).float()
        yv = y[fg]
        x = torch.zeros_like(x)
        x[fg] = (yv - yv.mean()) / yv.std().clamp_min(1e-6) * std + mean
        if self.R.rand() < 0.5:
            x[fg] = x[fg] * self.R.uniform(0.85, 1.15) + self.R.uniform(-0.2, 0.2)
        if self.R.rand() < 0.2:
            noise = torch.as_tensor(self.R.normal(0.0, 0.05, size=tuple(x.shape)), dtype=x.dtype)
            x[fg] = x[fg] + noise[fg]
        return x

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            d[key] = self._augment(torch.as_tensor(d[key]))
        return d


def train_transforms(roi: tuple[int, int], augmentation: str = "contrast") -> Compose:
    """Slice item -> 256x256 training patch (list of one dict, from the pos/neg crop).

    Geometric augmentation (rotation +-11 deg, scale +-15 %, mirror with side swap) is
    always on: with a handful of training volumes it is what keeps the network from
    memorising one anatomy. ``augmentation`` selects the contrast augmentation on top.
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
    steps: list[Any] = [
        EnsureTyped(keys=("image", "label"), track_meta=False),  # deterministic: cached by CacheDataset
        RandPadToWindowd(keys=("image", "label"), label_key="label", roi=roi),
        RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=roi,
                               pos=2.0, neg=1.0, num_samples=1, allow_smaller=False),
        RandFlipLeftRightd(image_key="image", label_key="label", prob=0.5),
        RandAffined(keys=("image", "label"), prob=0.5, rotate_range=(0.2,), scale_range=(0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
    ]
    if augmentation == "contrast":
        steps.append(RandContrastd(keys=("image",)))
    steps.append(EnsureTyped(keys=("image", "label"), track_meta=False))
    return Compose(steps)


def seed_transforms(transforms: Compose, seed: int) -> None:
    """Seed every random transform of ``transforms`` from one integer (done per epoch, so a
    resumed run draws the same augmentations as an uninterrupted one). MONAI's Compose
    derives one seed per member transform from its own generator."""
    transforms.set_random_state(seed=int(seed) % (2**32 - 1))
