"""The segmentation model as a MONAI bundle: metadata (labels, preprocessing) and TorchScript weights.

Bundle layout (MONAI bundle convention)::

    <bundle>/configs/metadata.json   label table, network definition, preprocessing, provenance
    <bundle>/models/model.ts         TorchScript: (B, 1, H, W) float32 -> (B, C, H, W) logits
    <bundle>/docs/README.md          model card

The label table lives here and only here: the application, the SEG writer and the SR
writer read names, codes and colours from :class:`ModelBundle.labels`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

METADATA_RELPATH = Path("configs") / "metadata.json"
TORCHSCRIPT_RELPATH = Path("models") / "model.ts"


class BundleError(ValueError):
    """The model bundle is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM code sequence item)."""

    scheme: str
    value: str
    meaning: str

    @classmethod
    def from_list(cls, item: list[str]) -> "Code":
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise BundleError(f"a code must be [scheme, value, meaning], got {item!r}")
        return cls(str(item[0]), str(item[1]), str(item[2]))


@dataclass(frozen=True)
class LabelInfo:
    """One output label: a muscle on one side of the patient."""

    value: int
    muscle: str
    side: str  # "right" | "left": the patient's side
    code: Code
    code_verified: bool
    laterality: Code
    category: Code
    color_rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.muscle} {self.side}"


PADDING_MODES = ("minimum", "reflect", "replicate")


@dataclass(frozen=True)
class PreprocessingSpec:
    """How an image is put into the model's space.

    Attributes:
        orientation: axis codes of the model space (``"RAS"``: voxel axis 0 increases towards
            the patient's right, axis 1 anterior, axis 2 superior); 2D slices are taken along axis 2.
        pixdim_mm: in-plane voxel spacing of the model space (axis 0, axis 1), mm.
        intensity: ``"zscore_nonzero"``: z-score over the non-zero voxels of the volume.
        roi_size: 2D window of the sliding-window inferer, voxels.
        overlap: overlap of neighbouring windows (0..1).
        blend_mode: ``"gaussian"`` or ``"constant"`` blending of overlapping windows.
        sw_batch_size: windows per forward pass.
        context_slices: neighbour slices on each side given to the network as extra input
            channels (2.5D input: channels k-n .. k+n along voxel axis 2 of the model space,
            the edge slice repeated past the ends); 0: one slice, one channel.
        padding: how a slice smaller than ``roi_size`` is padded up to the window, in the
            model space after normalisation. ``"minimum"``: the volume's minimum (bundles up to
            0.5.0); ``"reflect"``: the image mirrored at its edge (no new edge: a small field of
            view that cuts through the body is not framed as if air surrounded the muscles);
            ``"replicate"``: the edge voxels repeated.
    """

    orientation: str
    pixdim_mm: tuple[float, float]
    intensity: str
    roi_size: tuple[int, int]
    overlap: float
    blend_mode: str
    sw_batch_size: int
    context_slices: int = 0
    padding: str = "minimum"

    @property
    def in_channels(self) -> int:
        """Input channels of the network (1 + 2 x context_slices)."""
        return 1 + 2 * self.context_slices


@dataclass(frozen=True)
class PostprocessingSpec:
    largest_component_3d: bool
    fill_holes: bool


@dataclass
class ModelBundle:
    """A loaded bundle: metadata plus the TorchScript module on its device."""

    path: Path
    name: str
    version: str
    metadata: dict[str, Any]
    labels: tuple[LabelInfo, ...]
    preprocessing: PreprocessingSpec
    postprocessing: PostprocessingSpec
    num_classes: int
    network: torch.jit.ScriptModule
    device: torch.device
    weights_sha256: str
    lock: threading.Lock
    #: average the prediction with that of the left-right mirrored slice (labels swapped back);
    #: from ``inference.test_time_mirror`` in the metadata (off for bundles without it).
    test_time_mirror: bool = False

    def label(self, value: int) -> LabelInfo:
        for info in self.labels:
            if info.value == value:
                return info
        raise KeyError(value)

    def held_out_dice(self) -> dict[int, float]:
        """Per label, the post-processed Dice of these weights on held-out real data, from the
        model card's evaluation (:func:`held_out_dice`); labels never evaluated are absent."""
        return held_out_dice(self.metadata, self.weights_sha256)


def held_out_dice(metadata: dict[str, Any], weights_sha256: str) -> dict[int, float]:
    """Per label value, the mean post-processed Dice on held-out real data from the model card.

    The evaluation of exactly these weights (``metadata["evaluation"]`` measured with the same
    ``weights_sha256``) when there is one. A bundle trained on all the real data there is has no
    held-out real case left; its card then carries ``evaluation.cross_validation.per_label_dice``:
    the leave-one-subject-out figures of the same recipe (models trained without the case they are
    measured on), which are used instead, again only for the weights they were recorded for. A label
    no held-out case annotates is absent, so a reader can be told that its measurements have no
    real-data accuracy figure behind them."""
    evaluation = metadata.get("evaluation") or {}
    if not evaluation.get("measured") or evaluation.get("weights_sha256") != weights_sha256:
        cross_validation = evaluation.get("cross_validation") or {}
        if cross_validation.get("weights_sha256") != weights_sha256:
            return {}
        per_label = cross_validation.get("per_label_dice") or {}
        return {int(label): float(dice) for label, dice in per_label.items() if dice is not None}
    scores: dict[int, list[float]] = {}
    for case in evaluation.get("cases") or []:
        if not case.get("postprocessed", False):
            continue
        for row in case.get("rows") or []:
            label, dice = int(row.get("label", -1)), row.get("dice")
            if label > 0 and dice is not None:
                scores.setdefault(label, []).append(float(dice))
    return {label: sum(values) / len(values) for label, values in scores.items()}


def read_metadata(bundle_dir: Path) -> dict[str, Any]:
    """Read and parse ``configs/metadata.json`` with a clear error when absent or malformed."""
    path = Path(bundle_dir) / METADATA_RELPATH
    if not path.is_file():
        raise BundleError(f"model bundle {bundle_dir}: {METADATA_RELPATH} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON ({exc})") from exc


def parse_labels(metadata: dict[str, Any]) -> tuple[LabelInfo, ...]:
    """The label table from bundle metadata (``labels``, ``category``, ``laterality``)."""
    try:
        table = metadata["labels"]
        category = Code.from_list(metadata["category"])
        laterality = {side: Code.from_list(code) for side, code in metadata["laterality"].items()}
        labels = []
        for key, entry in sorted(table.items(), key=lambda kv: int(kv[0])):
            side = entry["side"]
            if side not in laterality:
                raise BundleError(f"label {key}: side {side!r} has no laterality code")
            labels.append(
                LabelInfo(
                    value=int(key),
                    muscle=str(entry["muscle"]),
                    side=side,
                    code=Code.from_list(entry["code"]),
                    code_verified=bool(entry.get("code_verified", False)),
                    laterality=laterality[side],
                    category=category,
                    color_rgb=tuple(int(c) for c in entry["color_rgb"]),  # type: ignore[arg-type]
                )
            )
    except KeyError as exc:
        raise BundleError(f"bundle metadata lacks {exc} in the label table") from exc
    if not labels or labels[0].value < 1:
        raise BundleError("bundle label table must list labels numbered from 1 (0 is background)")
    return tuple(labels)


def _parse_preprocessing(metadata: dict[str, Any]) -> PreprocessingSpec:
    try:
        pre = metadata["preprocessing"]
        spec = PreprocessingSpec(
            orientation=str(pre["orientation"]),
            pixdim_mm=(float(pre["pixdim_mm"][0]), float(pre["pixdim_mm"][1])),
            intensity=str(pre["intensity"]),
            roi_size=(int(pre["roi_size"][0]), int(pre["roi_size"][1])),
            overlap=float(pre.get("overlap", 0.25)),
            blend_mode=str(pre.get("blend_mode", "gaussian")),
            sw_batch_size=int(pre.get("sw_batch_size", 16)),
            context_slices=int(pre.get("context_slices", 0)),
            padding=str(pre.get("padding", "minimum")),  # absent: bundles up to 0.5.0
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle metadata: bad or missing preprocessing entry ({exc!r})") from exc
    if not 0 <= spec.context_slices <= 3:
        raise BundleError(f"bundle metadata: context_slices must be 0..3, got {spec.context_slices}")
    declared = metadata.get("network_def", {}).get("in_channels", spec.in_channels)
    if declared != spec.in_channels:  # the network would be fed the wrong number of slices
        raise BundleError(f"bundle metadata: network_def.in_channels {declared} does not match "
                          f"preprocessing.context_slices {spec.context_slices} (expects {spec.in_channels})")
    if spec.intensity != "zscore_nonzero":
        raise BundleError(f"bundle metadata: unsupported intensity normalisation {spec.intensity!r}")
    if spec.padding not in PADDING_MODES:
        raise BundleError(f"bundle metadata: preprocessing.padding must be one of {', '.join(PADDING_MODES)}, "
                          f"got {spec.padding!r}")
    if len(spec.orientation) != 3:
        raise BundleError(f"bundle metadata: orientation must be 3 axis codes, got {spec.orientation!r}")
    return spec


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_device() -> torch.device:
    """CUDA when a GPU is present, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def find_bundle(model_path: Path) -> Path:
    """Resolve ``model_path`` to a bundle directory.

    Accepts the bundle directory itself or a models folder holding exactly one bundle
    (the MAP contract passes the folder).
    """
    model_path = Path(model_path)
    if (model_path / METADATA_RELPATH).is_file():
        return model_path
    if model_path.is_dir():
        found = sorted(p.parent.parent for p in model_path.glob(f"*/{METADATA_RELPATH}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise BundleError(f"{model_path} holds several bundles ({', '.join(p.name for p in found)}): pass one")
    raise BundleError(f"no model bundle at {model_path} (expected {METADATA_RELPATH} inside)")


@functools.lru_cache(maxsize=4)
def _load_cached(bundle_dir: str, device: str) -> ModelBundle:
    path = Path(bundle_dir)
    metadata = read_metadata(path)
    labels = parse_labels(metadata)
    pred = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    num_classes = int(pred.get("num_channels", len(labels) + 1))
    if num_classes != len(labels) + 1:
        raise BundleError(f"{path}: {num_classes} output channels but {len(labels)} labels + background")
    weights = path / TORCHSCRIPT_RELPATH
    if not weights.is_file():
        raise BundleError(f"model bundle {path}: weights {TORCHSCRIPT_RELPATH} not found")
    torch_device = torch.device(device)
    network = torch.jit.load(str(weights), map_location=torch_device)
    network.eval()
    return ModelBundle(
        path=path,
        name=str(metadata.get("name", path.name)),
        version=str(metadata.get("version", "0")),
        metadata=metadata,
        labels=labels,
        preprocessing=_parse_preprocessing(metadata),
        postprocessing=PostprocessingSpec(
            largest_component_3d=bool(metadata.get("postprocessing", {}).get("largest_component_3d", True)),
            fill_holes=bool(metadata.get("postprocessing", {}).get("fill_holes", True)),
        ),
        num_classes=num_classes,
        network=network,
        device=torch_device,
        weights_sha256=_sha256(weights),
        lock=threading.Lock(),
        test_time_mirror=bool(metadata.get("inference", {}).get("test_time_mirror", False)),
    )


def load_bundle(model_path: Path, device: torch.device | str | None = None) -> ModelBundle:
    """Load a bundle once per process (cached by resolved path and device)."""
    bundle_dir = find_bundle(Path(model_path)).resolve()
    device = torch.device(device) if device is not None else default_device()
    return _load_cached(str(bundle_dir), str(device))
