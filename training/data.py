"""Training and evaluation cases: loading volumes and putting them into the model space.

A *case* is one labelled volume: an image (I, J, K) on a voxel grid with a RAS affine
(NIfTI / MONAI world: +x patient left->right, +y posterior->anterior, +z inferior->superior),
a label map in the bundle numbering (see :mod:`training.labels`), and the set of classes
its annotators actually labelled. A class that was not labelled in a case (psoas and
quadratus lumborum in MyoSegmenTUM) is *unknown* there, not background: the loss treats
it so (:mod:`training.losses`).

Volumes go into the model space with the very transforms the application uses
(:func:`paraspinal.preprocessing.model_space_transforms`: RAS, 1x1 mm in-plane, slice
spacing kept, z-score over non-zero voxels), and 2D training slices are taken along
voxel axis 2 of that RAS volume, i.e. ``vol[:, :, :, k]`` -> (1, I, J).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import nibabel as nib
import numpy as np
import torch

from paraspinal.model_bundle import PreprocessingSpec
from paraspinal.preprocessing import as_metatensor, model_space_transforms, with_neighbour_slices
from paraspinal.nifti_to_dicom import DEFAULT_REAL_DATA_DIR
from training.labels import ALL_CLASSES, NUM_CLASSES

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REAL_DATA_DIR = DEFAULT_REAL_DATA_DIR  # ../shared/data/real or $PARASPINAL_REAL_DATA

# The model space every bundle trained here uses (the application reads it from metadata).
MODEL_SPEC = PreprocessingSpec(
    orientation="RAS",
    pixdim_mm=(1.0, 1.0),
    intensity="zscore_nonzero",
    roi_size=(256, 256),
    overlap=0.25,
    blend_mode="gaussian",
    sw_batch_size=16,
    # Slices smaller than the window are mirrored at their edge, not framed by the volume minimum:
    # with the minimum a 160 mm field of view lost every muscle (model card, 'Padding').
    padding="reflect",
)


class CaseError(ValueError):
    """A case cannot be loaded (missing file, grid mismatch, unknown label value)."""


@dataclass(frozen=True)
class LoadedCase:
    """One volume on its source grid.

    Attributes:
        case_id: identifier used on the command line and in reports.
        image: (I, J, K) float32 intensities on the source voxel grid.
        label: (I, J, K) uint8 labels in the bundle numbering, or None (unlabelled image).
        affine_ras: 4x4 voxel -> RAS world (mm) affine of the source grid.
        labelled_classes: classes whose absence in ``label`` is meaningful (0 is always in).
        source: one line saying where the data came from (for model cards and reports).
        components: named source images on the same grid that ``image`` was made from
            (Dixon ``water`` and ``fat``), for contrast synthesis in training; empty otherwise.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine_ras: np.ndarray
    labelled_classes: tuple[int, ...]
    source: str
    components: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along voxel axes (I, J, K), mm (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine_ras[:3, :3], axis=0))  # type: ignore[return-value]


class CaseSource(Protocol):
    case_id: str

    def load(self) -> LoadedCase: ...


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise CaseError(f"{path}: file not found")
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)


def remap_labels(label: np.ndarray, label_map: Mapping[int, int], where: str) -> np.ndarray:
    """Map source label values to the bundle numbering; an unknown non-zero value is an error."""
    values = {int(v) for v in np.unique(label)} - {0}
    unknown = values - set(label_map)
    if unknown:
        raise CaseError(f"{where}: label value(s) {sorted(unknown)} have no mapping to the bundle labels")
    out = np.zeros(label.shape, dtype=np.uint8)
    for source_value, bundle_value in label_map.items():
        out[label == source_value] = bundle_value
    return out


@dataclass(frozen=True)
class NiftiCase:
    """A case stored as NIfTI files.

    Attributes:
        image_paths: one or more images on the same grid, summed voxel-wise (MyoSegmenTUM
            water + fat approximates an in-phase image, where fat is bright as on T2 TSE).
        label_path: label map on the same grid.
        label_map: source label value -> bundle label value.
        labelled_classes: bundle classes the annotation covers (0 implied).
        component_names: names of ``image_paths`` (e.g. ``("water", "fat")``), kept apart in
            :attr:`LoadedCase.components` for contrast synthesis; empty: not kept.
    """

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    label_map: Mapping[int, int]
    labelled_classes: tuple[int, ...]
    source: str = ""
    component_names: tuple[str, ...] = ()

    def load(self) -> LoadedCase:
        image, affine = _read_nifti(self.image_paths[0])
        image = image.astype(np.float32)
        parts = [image.copy()]
        for extra in self.image_paths[1:]:
            other, _ = _read_nifti(extra)
            if other.shape != image.shape:
                raise CaseError(f"{extra}: grid {other.shape} differs from {self.image_paths[0]} {image.shape}")
            # The MyoSegmenTUM fat file carries a different origin in its header although it is
            # the same acquisition and grid as the water image; the water/label affine is used.
            parts.append(other.astype(np.float32))
            image = image + parts[-1]
        components = dict(zip(self.component_names, parts)) if self.component_names else {}
        label = None
        if self.label_path is not None:
            raw, label_affine = _read_nifti(self.label_path)
            if raw.shape != image.shape:
                raise CaseError(f"{self.label_path}: grid {raw.shape} differs from the image {image.shape}")
            if not np.allclose(label_affine[:3, :3], affine[:3, :3], atol=1e-3):
                raise CaseError(f"{self.label_path}: voxel axes differ from the image's")
            label = remap_labels(raw, self.label_map, str(self.label_path))
        classes = tuple(sorted({0, *self.labelled_classes}))
        return LoadedCase(self.case_id, image, label, affine, classes, self.source or self.case_id, components)


def real_cases(data_dir: Path = REAL_DATA_DIR) -> dict[str, NiftiCase]:
    """The shared real fixtures, by case id (see /work/shared/data/README.md)."""
    return {
        "musclemap_sub0001": NiftiCase(
            case_id="musclemap_sub0001",
            image_paths=(data_dir / "musclemap_sub0001_image.nii.gz",),
            label_path=data_dir / "musclemap_sub0001_dseg.nii.gz",
            label_map={v: v for v in range(1, NUM_CLASSES)},
            labelled_classes=ALL_CLASSES,
            source="MuscleMap sample sub-0001: axial lumbar TSE, 20 slices 0.94x0.94x4.4 mm, "
            "8 muscle labels (MIT licence)",
        ),
        "myosegmentum_tum01": NiftiCase(
            case_id="myosegmentum_tum01",
            image_paths=(data_dir / "myosegmentum_tum01_water.nii.gz", data_dir / "myosegmentum_tum01_fat.nii.gz"),
            label_path=data_dir / "myosegmentum_tum01_label.nii.gz",
            # source: 1 ES R, 2 MF R, 3 MF L, 4 ES L -> bundle: 3, 1, 2, 4
            label_map={1: 3, 2: 1, 3: 2, 4: 4},
            labelled_classes=(0, 1, 2, 3, 4),
            source="MyoSegmenTUM spine tum01 (Burian et al. 2019): Dixon water+fat (in-phase "
            "approximation), 29 slices 1.02x1.02x4.0 mm, manual multifidus and erector spinae only",
        ),
    }


def site_cases(data_dir: Path) -> dict[str, "NiftiCase | DicomSegCase"]:
    """Site data for fine-tuning: ``<case>_image.nii.gz`` + ``<case>_label.nii.gz`` pairs, and
    ``<case>/image/`` DICOM series + ``<case>/seg.dcm`` DICOM SEG folders.

    Labels must use the bundle numbering unless ``dataset.json`` in ``data_dir`` says
    otherwise (for SEG, segments are mapped from their label text unless ``segment_map`` or
    a per-case ``label_map`` gives segment number -> bundle label)::

        {"label_map": {"1": 3, "2": 1, ...},          # source value -> bundle value
         "labelled_classes": [0, 1, 2, 3, 4],          # classes the annotation covers
         "cases": {"<case>": {"label_map": ..., "labelled_classes": ...}}}   # per-case overrides

    Images without a label file are skipped (they cannot be trained on).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CaseError(f"--data-dir {data_dir}: not a directory")
    config: dict[str, Any] = {}
    if (data_dir / "dataset.json").is_file():
        config = json.loads((data_dir / "dataset.json").read_text())
    cases: dict[str, NiftiCase | DicomSegCase] = {}
    for image_path in sorted(data_dir.glob("*_image.nii*")):
        case_id = image_path.name.split("_image.nii")[0]
        suffix = image_path.name.split("_image")[1]
        label_path = data_dir / f"{case_id}_label{suffix}"
        if not label_path.is_file():
            continue
        override = config.get("cases", {}).get(case_id, {})
        raw_map = override.get("label_map", config.get("label_map"))
        label_map = {int(k): int(v) for k, v in raw_map.items()} if raw_map else {v: v for v in range(1, NUM_CLASSES)}
        labelled = tuple(int(c) for c in override.get("labelled_classes", config.get("labelled_classes", ALL_CLASSES)))
        cases[f"site:{case_id}"] = NiftiCase(
            case_id=f"site:{case_id}",
            image_paths=(image_path,),
            label_path=label_path,
            label_map=label_map,
            labelled_classes=labelled,
            source=f"site data {image_path.name}",
        )
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        if (folder / "image").is_dir() and (folder / "seg.dcm").is_file():
            override = config.get("cases", {}).get(folder.name, {})
            raw_map = override.get("label_map", config.get("segment_map"))
            cases[f"site:{folder.name}"] = DicomSegCase(
                case_id=f"site:{folder.name}",
                series_dir=folder / "image",
                seg_path=folder / "seg.dcm",
                label_map={int(k): int(v) for k, v in raw_map.items()} if raw_map else None,
                labelled_classes=tuple(int(c) for c in override.get(
                    "labelled_classes", config.get("labelled_classes", ALL_CLASSES))),
            )
    from paraspinal.site_dataset import list_cases

    for stored in list_cases(data_dir):  # corrections the node received (cases/<id>/, paraspinal.site_dataset)
        cases[f"site:{stored.case_id}"] = NiftiCase(
            case_id=f"site:{stored.case_id}",
            image_paths=(stored.image_path,),
            label_path=stored.label_path,
            label_map={v: v for v in range(1, NUM_CLASSES)},
            labelled_classes=stored.labelled_classes,
            source=f"site correction {stored.case_id} (labels {list(stored.labelled_classes)[1:]})",
        )
    if not cases:
        raise CaseError(f"--data-dir {data_dir}: no <case>_image.nii[.gz] with a matching <case>_label file, "
                        "no <case>/image/ + <case>/seg.dcm folder and no cases/<id>/ site correction")
    return cases


@dataclass(frozen=True)
class DicomSegCase:
    """A site case stored as an MR series folder plus a DICOM SEG (see training.site_dicom)."""

    case_id: str
    series_dir: Path
    seg_path: Path
    label_map: Mapping[int, int] | None
    labelled_classes: tuple[int, ...]

    def load(self) -> LoadedCase:
        from training.site_dicom import dicom_seg_case

        return dicom_seg_case(self.case_id, self.series_dir, self.seg_path, self.label_map, self.labelled_classes)


def to_model_space(case: LoadedCase, spec: PreprocessingSpec = MODEL_SPEC) -> dict[str, Any]:
    """The case in model space: ``{"image": MetaTensor (1, I, J, K), "label": ... (if any)}``.

    Uses the shared, invertible preprocessing (orientation, in-plane spacing, z-score).
    """
    data: dict[str, Any] = {"image": as_metatensor(case.image, case.affine_ras)}
    label_keys: tuple[str, ...] = ()
    if case.label is not None:
        data["label"] = as_metatensor(case.label, case.affine_ras)
        label_keys = ("label",)
    for name, component in case.components.items():
        data[name] = as_metatensor(component, case.affine_ras)
    return model_space_transforms(spec, ("image",), label_keys, tuple(case.components))(data)


def with_background_noise(case: LoadedCase, percent: float, seed: int = 0) -> LoadedCase:
    """``case`` with Rayleigh noise in its exactly-zero voxels, as a magnitude image's air has it.

    MyoSegmenTUM's Dixon volumes are masked to 0 outside the body; a real scan is never. The
    noise is the magnitude of complex Gaussian noise whose std is ``percent`` % of the median
    non-zero intensity (a real scan: about 1-3 %); seeded, so a run is repeatable. Dixon
    components, when the case has them, keep their masked background.
    """
    if percent <= 0:
        raise CaseError(f"--background-noise must be positive, got {percent}")
    image = case.image.astype(np.float32)
    air = image == 0
    if not air.any():
        raise CaseError(f"{case.case_id}: no zero-valued background to fill with noise")
    sigma = percent / 100.0 * float(np.median(image[~air]))
    rng = np.random.default_rng(seed)
    noise = np.hypot(rng.normal(0.0, sigma, image.shape), rng.normal(0.0, sigma, image.shape)).astype(np.float32)
    return replace(case, image=np.where(air, noise, image))


MASKED_BACKGROUND_MIN = 0.2  # share of exactly-0 voxels above which a background counts as masked


def with_real_air(case: LoadedCase, percent: float, seed: int = 0) -> LoadedCase:
    """``case`` with noise in its background (:func:`with_background_noise`) when that background is
    masked (more than ``MASKED_BACKGROUND_MIN`` of the voxels exactly 0, as MyoSegmenTUM's); any other
    case unchanged (a scanner's own few zeros, e.g. MuscleMap's 6 % at its edges, are left alone).

    A masked background stays exactly 0, which the z-score over non-zero voxels leaves at 0 (a mid
    grey), while every real scan's air is noise that the z-score makes dark; a network that learned
    the grey air lost the muscles on the same volume with real air (model card, 'Background').
    """
    if masked_background_share(case) <= MASKED_BACKGROUND_MIN:
        return case
    return with_background_noise(case, percent, seed)


def masked_background_share(case: LoadedCase) -> float:
    """Share of the case's voxels that are exactly 0: a masked background (MyoSegmenTUM's Dixon
    volumes about 0.56) rather than a scanner's noise (MuscleMap 0.06, at its edges)."""
    return float((case.image == 0).mean())


# Tissue map values (training.transforms.RandLabelSynthd): 1-8 the labelled muscles, then
# MASKED_TISSUE for voxels a scanner or reconstruction set to exactly 0, then the intensity
# clusters of everything else (fat, bone, disc, viscera, air... unnamed).
MASKED_TISSUE = NUM_CLASSES
TISSUE_CLUSTERS = 4


def tissue_map(image: np.ndarray, label: np.ndarray, labelled_classes: Sequence[int]) -> np.ndarray:
    """Label-driven synthesis input (SynthSeg, Billot et al. 2023), same shape as ``image``.

    Labelled muscles keep their label; unlabelled tissue is split into ``TISSUE_CLUSTERS``
    intensity classes by multi-Otsu thresholds over the volume (scikit-image), so a synthetic
    image drawn from the map keeps the real anatomy of fat, bone, disc and viscera without
    anyone having labelled them. Classes the case does not label (psoas in MyoSegmenTUM) fall
    into the clusters, like any other unlabelled tissue.
    """
    from skimage.filters import threshold_multiotsu

    muscle = np.isin(label, [c for c in labelled_classes if c != 0]) & (label > 0)
    out = np.where(muscle, label, 0).astype(np.uint8)
    masked = (image == 0) & ~muscle
    out[masked] = MASKED_TISSUE
    rest = ~muscle & ~masked
    values = image[rest]
    if values.size > 100 and np.unique(values[: 10_000]).size > TISSUE_CLUSTERS:
        thresholds = threshold_multiotsu(values, classes=TISSUE_CLUSTERS)
        out[rest] = MASKED_TISSUE + 1 + np.digitize(values, thresholds).astype(np.uint8)
    else:
        out[rest] = MASKED_TISSUE + 1
    return out


@dataclass
class SliceSet:
    """2D training items of one case, plus a summary line for the model card."""

    case_id: str
    items: list[dict[str, Any]] = field(default_factory=list)
    summary: str = ""


def case_slices(case: LoadedCase, spec: PreprocessingSpec = MODEL_SPEC, only_labelled: bool = True) -> SliceSet:
    """Axial 2D items ``vol[:, :, :, k]`` of a labelled case in model space.

    Each item: ``image`` (1 + 2n, I, J) float32 z-scored (n = ``spec.context_slices``: the
    neighbour slices of a 2.5D model as extra channels, centre slice in the middle), ``label`` (1, I, J) int64 bundle
    labels, ``tissue`` (1 + 2n, I, J) int64 (:func:`tissue_map`, neighbour slices like ``image``), the case's components (Dixon
    ``water``/``fat``, resampled, own units) when it has them, ``labelled`` (NUM_CLASSES,) float32 1/0 per class, ``pad_value`` (the volume
    minimum, one of the training paddings: :class:`training.transforms.RandPadToWindowd`) and provenance keys.
    Slices without any muscle label are skipped when ``only_labelled``: the annotation of
    such a slice is often just absent rather than "no muscle here".
    """
    if case.label is None:
        raise CaseError(f"{case.case_id}: no label map, cannot train on it")
    data = to_model_space(case, spec)
    image = data["image"].as_tensor().float()
    label = data["label"].as_tensor().round().to(torch.int64)
    tissue = torch.from_numpy(tissue_map(image.numpy(), label.numpy(), case.labelled_classes).astype(np.int64))
    tissue = with_neighbour_slices(tissue, spec.context_slices)  # each channel re-drawn from its own slice
    components = {name: with_neighbour_slices(data[name].as_tensor().float(), spec.context_slices)
                  for name in case.components}
    pad_value = float(image.min())
    image = with_neighbour_slices(image, spec.context_slices)  # (1 + 2n, I, J, K); 2D: unchanged
    labelled = torch.zeros(NUM_CLASSES, dtype=torch.float32)
    labelled[list(case.labelled_classes)] = 1.0
    items = []
    for k in range(image.shape[-1]):
        lab = label[..., k]
        if only_labelled and not bool((lab > 0).any()):
            continue
        item = {
            "image": image[..., k].clone(),
            "label": lab.clone(),
            "tissue": tissue[..., k].clone(),
            "labelled": labelled.clone(),
            "pad_value": pad_value,
            "case": case.case_id,
            "slice": k,
        }
        item.update({name: component[..., k].clone() for name, component in components.items()})
        items.append(item)
    summary = f"{case.case_id}: {len(items)} slices ({case.source})"
    return SliceSet(case.case_id, items, summary)


def check_held_out(train_ids: Sequence[str], eval_ids: Sequence[str]) -> None:
    """Refuse a configuration that would evaluate on a case it trained on."""
    overlap = sorted(set(train_ids) & set(eval_ids))
    if overlap:
        raise CaseError(f"case(s) {overlap} are both training and held-out evaluation data")
