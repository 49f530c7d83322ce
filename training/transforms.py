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
    Rand2DElasticd,
    SelectItemsd,
)
from scipy import ndimage

from training.labels import NUM_CLASSES, SIDE_SWAP

AUGMENTATIONS = ("none", "contrast")
GEOMETRIES = ("basic", "strong")


class RandPadToWindowd(RandomizableTransform, MapTransform):
    """Pad image and label to at least ``roi`` (centred), as an inferer pads small slices.

    With the volume minimum (``pad_value`` of the item: what bundles up to 0.5.0 were inferred
    with) or 0 (MONAI's default), each drawn with probability 1/2. Labels are padded with 0.
    Bundles from 0.5.1 infer with reflection padding instead (``PreprocessingSpec.padding``):
    measured on the held-out folds, the network trained this way segments a small field of view
    far better reflected than framed by the minimum (model card, 'Padding').
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

    ``gamma``: ``None`` draws the gamma of step 2 uniformly from 0.6-1.6 (recipes up to 0.6.0);
    ``(low, high)`` draws it log-uniformly from that range instead, as many below 1 as above. Why
    wider: muscle sits at 6 % of the foreground's intensity range on MuscleMap's T2 TSE and at
    27 % on MyoSegmenTUM's water + fat sum, a gamma of 0.48 (or 2.1 the other way), outside
    0.6-1.6; the fold models lost the muscles of the subject whose contrast they never saw.
    Measured (0.6.0 card, 'Contrast'): 0.4-2.5 made the fold A models worse on tum01 in every
    contrast tried (20 real training slices); not in the shipped recipe.
    """

    def __init__(self, keys: KeysCollection, gamma: tuple[float, float] | None = None):
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys)
        if gamma is not None and not 0 < gamma[0] <= 1 <= gamma[1]:
            raise ValueError(f"gamma must be a range 0 < low <= 1 <= high, got {gamma!r}")
        self.log_gamma = None if gamma is None else (float(np.log(gamma[0])), float(np.log(gamma[1])))
        self.bias = RandBiasField(degree=3, coeff_range=(0.0, 0.3), prob=0.5)
        self.gamma = RandAdjustContrast(prob=0.5, gamma=(0.6, 1.6))
        self.histogram = RandHistogramShift(num_control_points=(5, 10), prob=0.3)

    def _gamma(self, y: torch.Tensor) -> torch.Tensor:
        if self.log_gamma is None:
            return torch.as_tensor(self.gamma(y.clamp_min(0))).float()
        if self.R.rand() >= 0.5:
            return y
        return y.clamp_min(0) ** float(np.exp(self.R.uniform(*self.log_gamma)))

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
        y = self._gamma(y)
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


def _zscore_nonzero(x: torch.Tensor) -> torch.Tensor:
    """Z-score over the non-zero voxels, zeros kept (the application's normalisation)."""
    fg = x != 0
    out = torch.zeros_like(x)
    if int(fg.sum()) > 1:
        vals = x[fg]
        out[fg] = (vals - vals.mean()) / vals.std().clamp_min(1e-6)
    return out


class RandFieldOfViewd(RandomizableTransform, MapTransform):
    """A clinical field of view: the slice cropped in-plane to a random rectangle around the spine.

    Clinical axial lumbar T2 is often acquired with a 160-220 mm field of view centred on the
    spinal canal, where the training volumes show the whole trunk (up to 400 mm). A network that
    only saw whole trunks can fail outright on the small field of view (model card, 'Field of
    view'). The crop is ``fov_mm`` wide (left-right, model axis 0, 1 mm pixels) and at most as
    high (anterior-posterior, axis 1), centred on the labelled muscles moved up to 40 mm anterior
    (towards the canal) with +-15 mm jitter; then, as the application does with such a volume,
    re-z-scored over the crop's non-zero voxels (the zeros the volume's z-score kept stay 0; the
    centre channel's statistics for every channel, as one volume's statistics serve all of a 2.5D
    input's channels) and ``pad_value`` set to the crop's minimum (see :class:`RandPadToWindowd`).
    """

    def __init__(self, prob: float = 0.5, fov_mm: tuple[float, float] = (140.0, 260.0)):
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, ("image", "label"))
        if not 0 < fov_mm[0] <= fov_mm[1]:
            raise ValueError(f"fov_mm must be 0 < low <= high, got {fov_mm!r}")
        self.fov_mm = fov_mm

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        width = self.R.uniform(*self.fov_mm)
        height = self.R.uniform(self.fov_mm[0], width)
        anterior, jitter = self.R.uniform(0.0, 40.0), self.R.uniform(-15.0, 15.0, size=2)
        if not self._do_transform:
            return d
        image, label = torch.as_tensor(d["image"]), torch.as_tensor(d["label"])
        shape = image.shape[1:]
        where = torch.nonzero(label[0] > 0)
        centre = where.float().mean(0).numpy() if len(where) else np.array(shape, dtype=float) / 2.0
        centre = centre + np.array([0.0, anterior]) + jitter
        box = []
        for axis, size in enumerate((width, height)):
            n = shape[axis]
            if n <= size:
                box.append(slice(0, n))
                continue
            start = int(np.clip(round(centre[axis] - size / 2.0), 0, n - round(size)))
            box.append(slice(start, start + int(round(size))))
        image, label = image[:, box[0], box[1]], label[:, box[0], box[1]]
        middle = image[image.shape[0] // 2]
        values = middle[middle != 0]
        if values.numel() > 1:
            mean, std = values.mean(), values.std().clamp_min(1e-6)
            image = torch.where(image != 0, (image - mean) / std, torch.zeros_like(image))
        d["image"], d["label"] = image.contiguous(), label.contiguous()
        d["pad_value"] = float(image.min())
        return d


class RandAirMargind(RandomizableTransform, MapTransform):
    """A wider field of view than the training slice shows: the body framed by air.

    MuscleMap's slices are cropped to the trunk (240 x 195 mm, almost no air), so a network
    trained on them alone never sees the body's outline against air; its only "outside" is the
    0 (a mid grey after the z-score) that padding and affine warps add. On a whole-trunk scan
    (MyoSegmenTUM, 400 mm) with real, dark air, such a network found muscle along the body's
    edge and lost the muscles it segments with grey air (model card, 'Background'; the larger
    cause was the contrast, section 'Contrast', and this option's runs were not finished). This frames
    the slice with air on each side (0 to ``margin_mm`` pixels of 1 mm, drawn per side) and,
    with ``ellipse_prob``, cuts an elliptical body outline first: everything outside an
    axis-aligned ellipse that holds the labelled muscles with at least ``muscle_margin_mm`` to
    spare becomes air (the cut runs through the subcutaneous fat around the muscles, a bright
    rim on dark air, as skin on a real scan). Air is the item's ``pad_value`` (the volume's
    darkest z-scored voxel) plus Rayleigh noise of ``noise`` (fraction of ``|pad_value|``) per
    channel. Labels outside the body are 0 by construction; ``pad_value`` is kept.
    """

    def __init__(self, prob: float = 0.5, margin_mm: tuple[int, int] = (0, 120), ellipse_prob: float = 0.5,
                 muscle_margin_mm: float = 10.0, noise: tuple[float, float] = (0.01, 0.04)):
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, ("image", "label"))
        if not 0 <= margin_mm[0] <= margin_mm[1]:
            raise ValueError(f"margin_mm must be 0 <= low <= high, got {margin_mm!r}")
        if not 0 <= noise[0] <= noise[1]:
            raise ValueError(f"noise must be 0 <= low <= high, got {noise!r}")
        self.margin_mm, self.ellipse_prob, self.muscle_margin_mm, self.noise = margin_mm, ellipse_prob, muscle_margin_mm, noise

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        margins = self.R.randint(self.margin_mm[0], self.margin_mm[1] + 1, size=4)
        ellipse, widen = self.R.rand() < self.ellipse_prob, self.R.uniform(1.0, 1.3, size=2)
        noise_fraction, noise_seed = self.R.uniform(*self.noise), int(self.R.randint(0, 2**31 - 1))
        if not self._do_transform:
            return d
        image, label = torch.as_tensor(d["image"]).float(), torch.as_tensor(d["label"])
        level = float(d.get("pad_value", float(image.min())))
        channels, ni, nj = image.shape
        height, width = ni + int(margins[0] + margins[1]), nj + int(margins[2] + margins[3])
        generator = torch.Generator().manual_seed(noise_seed)
        sigma = noise_fraction * max(abs(level), 1e-3)
        rayleigh = torch.hypot(torch.randn(channels, height, width, generator=generator),
                               torch.randn(channels, height, width, generator=generator))
        air = level + sigma * rayleigh
        inside = torch.ones(ni, nj, dtype=torch.bool)
        where = torch.nonzero(label[0] > 0)
        if ellipse and len(where):
            low, high = where.min(0).values.float(), where.max(0).values.float()
            centre, half = (low + high) / 2.0, (high - low) / 2.0 + self.muscle_margin_mm
            axes = half * np.sqrt(2.0) * torch.as_tensor(widen, dtype=torch.float32)  # holds the box's corners
            ii, jj = torch.meshgrid(torch.arange(ni, dtype=torch.float32), torch.arange(nj, dtype=torch.float32),
                                    indexing="ij")
            inside = ((ii - centre[0]) / axes[0]) ** 2 + ((jj - centre[1]) / axes[1]) ** 2 <= 1.0
        box = (slice(None), slice(int(margins[0]), int(margins[0]) + ni), slice(int(margins[2]), int(margins[2]) + nj))
        air[box] = torch.where(inside, image, air[box])
        framed = torch.zeros((label.shape[0], height, width), dtype=label.dtype)
        framed[box] = torch.where(inside, label, torch.zeros_like(label))
        d["image"], d["label"] = air, framed
        return d


class RandDixonContrastd(RandomizableTransform, MapTransform):
    """Many contrasts from one Dixon acquisition: the image is re-made from the item's
    ``water`` W and ``fat`` F (model space, own units) and z-scored as the application does.

    Drawn among (probabilities in brackets):

    * a*W + b*F, a in [0.3, 1.2], b in [0.6, 2.0] (0.4): fat as bright as or brighter than
      muscle and fluid, as on T2 TSE and T1;
    * W + b*F, b in [0, 0.25] (0.2): water-only / fat-suppressed;
    * |W - F| (0.15): opposed phase (dark rims at muscle-fat borders);
    * W + F (0.25): in phase, the image the item already has.

    Items without ``water``/``fat`` pass unchanged.
    """

    def __init__(self, prob: float = 0.7):
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, ("image",))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform or "water" not in d or "fat" not in d:
            return d
        water = torch.as_tensor(d["water"]).float().clamp_min(0)
        fat = torch.as_tensor(d["fat"]).float().clamp_min(0)
        kind = self.R.rand()
        if kind < 0.4:
            mixed = self.R.uniform(0.3, 1.2) * water + self.R.uniform(0.6, 2.0) * fat
        elif kind < 0.6:
            mixed = water + self.R.uniform(0.0, 0.25) * fat
        elif kind < 0.75:
            mixed = (water - fat).abs()
        else:
            mixed = water + fat
        d["image"] = _zscore_nonzero(mixed)
        return d


class RandLabelSynthd(RandomizableTransform, MapTransform):
    """Label-driven image synthesis (SynthSeg, Billot et al., Med Image Anal 2023) on 2D slices.

    The image is re-drawn from the item's ``tissue`` map (:func:`training.data.tissue_map`:
    muscles 1-8, masked background, unlabelled intensity clusters) with a random intensity per
    class, so the network cannot rely on any one scanner's contrast and has to use shape and
    context. Two flavours, drawn with equal probability:

    * Gaussian: each class a random mean in [0, 1] and standard deviation in [0, 0.06];
    * texture-keeping: each class's real voxels z-scored within the class and mapped to a
      random mean and spread in [0.01, 0.08], so intramuscular fat streaks and fascia stay.

    Muscles share one mean (+-0.05) with probability 0.5 (real muscles look alike; the label
    must then come from anatomy) and get independent means otherwise. Masked background stays
    0 with probability 0.8. Then a Gaussian blur of sigma in [0, 1] voxel (partial volume) and
    the z-score. Bias field, gamma and noise come after, from :class:`RandContrastd`. A 2.5D
    item's neighbour slices are re-drawn from their own tissue maps with the same intensity per
    class, so the channels stay one acquisition.
    """

    def __init__(self, prob: float = 0.4):
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, ("image",))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform or "tissue" not in d:
            return d
        image = torch.as_tensor(d["image"]).float().numpy()
        tissue = torch.as_tensor(d["tissue"]).numpy()
        texture = self.R.rand() < 0.5
        shared_muscle = self.R.uniform(0.0, 1.0) if self.R.rand() < 0.5 else None
        out = np.zeros(image.shape, dtype=np.float32)
        for value in np.unique(tissue):
            where = tissue == value
            if value == NUM_CLASSES and self.R.rand() < 0.8:  # masked background stays masked
                continue
            if 0 < value < NUM_CLASSES and shared_muscle is not None:
                mean = float(np.clip(shared_muscle + self.R.uniform(-0.05, 0.05), 0.0, 1.0))
            else:
                mean = self.R.uniform(0.0, 1.0)
            if texture:
                vals = image[where]
                spread = self.R.uniform(0.01, 0.08)
                out[where] = mean + spread * (vals - vals.mean()) / max(float(vals.std()), 1e-6)
            else:
                out[where] = mean + self.R.uniform(0.0, 0.06) * self.R.standard_normal(int(where.sum()))
        sigma = self.R.uniform(0.0, 1.0)
        if sigma > 0.2:
            for c in range(out.shape[0]):  # a 2.5D item: every slice blurred alike, in-plane only
                out[c] = ndimage.gaussian_filter(out[c], sigma)
        d["image"] = _zscore_nonzero(torch.from_numpy(out))
        return d


def train_transforms(roi: tuple[int, int], augmentation: str = "contrast", geometry: str = "basic",
                     label_synthesis: float = 0.0, dixon_contrasts: float = 0.0, fov_crop: float = 0.0,
                     air_margin: float = 0.0, gamma: tuple[float, float] | None = None) -> Compose:
    """Slice item -> 256x256 training patch (list of one dict, from the pos/neg crop).

    Geometric augmentation is always on: with a handful of training volumes it is what
    keeps the network from memorising one anatomy. ``basic``: rotation +-11 deg, scale +-15 %
    per axis (p=0.5), mirror with side swap. ``strong`` adds body-habitus and field-of-view
    variety: rotation +-17 deg, scale +-25 % per axis (anisotropic), shear +-0.1 (p=0.7),
    and an elastic deformation (p=0.25). ``augmentation`` selects the contrast augmentation
    on top; ``dixon_contrasts`` / ``label_synthesis`` are the probabilities of
    :class:`RandDixonContrastd` and :class:`RandLabelSynthd`, applied to the whole slice first;
    ``fov_crop`` the probability of :class:`RandFieldOfViewd` (a clinical field of view), next;
    ``air_margin`` the probability of :class:`RandAirMargind` (the body framed by air), after it;
    ``gamma`` the log-uniform gamma range of :class:`RandContrastd` (``None``: 0.6-1.6 uniform).
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    steps: list[Any] = [EnsureTyped(keys=("image", "label"), track_meta=False)]  # deterministic: cached
    if dixon_contrasts > 0:
        steps.append(RandDixonContrastd(prob=dixon_contrasts))
    if label_synthesis > 0:
        steps.append(RandLabelSynthd(prob=label_synthesis))
    steps += [
        SelectItemsd(keys=("image", "label", "labelled", "pad_value")),
        *([RandFieldOfViewd(prob=fov_crop)] if fov_crop > 0 else []),
        *([RandAirMargind(prob=air_margin)] if air_margin > 0 else []),
        RandPadToWindowd(keys=("image", "label"), label_key="label", roi=roi),
        RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=roi,
                               pos=2.0, neg=1.0, num_samples=1, allow_smaller=False),
        RandFlipLeftRightd(image_key="image", label_key="label", prob=0.5),
    ]
    if geometry == "basic":
        steps.append(RandAffined(keys=("image", "label"), prob=0.5, rotate_range=(0.2,), scale_range=(0.15, 0.15),
                                 mode=("bilinear", "nearest"), padding_mode="zeros"))
    else:
        steps += [
            RandAffined(keys=("image", "label"), prob=0.7, rotate_range=(0.3,), scale_range=(0.25, 0.25),
                        shear_range=(0.1, 0.1), mode=("bilinear", "nearest"), padding_mode="zeros"),
            Rand2DElasticd(keys=("image", "label"), spacing=(32, 32), magnitude_range=(1.0, 4.0), prob=0.25,
                           mode=("bilinear", "nearest"), padding_mode="zeros"),
        ]
    if augmentation == "contrast":
        steps.append(RandContrastd(keys=("image",), gamma=gamma))
    steps.append(EnsureTyped(keys=("image", "label"), track_meta=False))
    return Compose(steps)


def seed_transforms(transforms: Compose, seed: int) -> None:
    """Seed every random transform of ``transforms`` from one integer (done per epoch, so a
    resumed run draws the same augmentations as an uninterrupted one). MONAI's Compose
    derives one seed per member transform from its own generator."""
    transforms.set_random_state(seed=int(seed) % (2**32 - 1))
