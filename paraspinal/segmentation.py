"""Model inference on one stack: model space in, labels on the source grid out.

Slices are segmented in 2D by MONAI's sliding-window inferer with a (H, W, 1) window, so
many slices go through the network in one batch; class probabilities are mapped back to
the source grid with MONAI's ``Invertd`` (the exact inverse of the preprocessing), and the
label is the arg-max there, so the mask follows the source pixels rather than the 1 mm grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, Invertd

from paraspinal.model_bundle import ModelBundle
from paraspinal.postprocess import postprocess_labels
from paraspinal.preprocessing import as_metatensor, lps_affine_to_ras, model_space_transforms
from paraspinal.stacks import StackVolume


@dataclass
class ModelInput:
    """A stack in the model's space, with what is needed to map predictions back."""

    data: dict  # {"image": MetaTensor (1, I, J, K)} after the preprocessing transforms
    transforms: Compose


def to_model_space(stack: StackVolume, bundle: ModelBundle) -> ModelInput:
    """Reorient, resample in-plane and normalise a stack as the bundle prescribes."""
    volume_ijk = stack.pixels.transpose(2, 1, 0)  # (slice,row,col) -> (col,row,slice) = (i,j,k)
    image = as_metatensor(volume_ijk, lps_affine_to_ras(stack.affine_lps))
    transforms = model_space_transforms(bundle.preprocessing)
    return ModelInput(data=transforms({"image": image}), transforms=transforms)


class _SliceNetwork(torch.nn.Module):
    """Presents a 2D network to a 3D sliding-window inferer whose windows are one slice deep."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W, 1) -> (B, C, H, W, 1)
        return self.network(x[..., 0]).unsqueeze(-1)


def infer_probabilities(model_input: ModelInput, bundle: ModelBundle) -> MetaTensor:
    """Softmax class probabilities in model space, (C, I, J, K)."""
    spec = bundle.preprocessing
    image = model_input.data["image"]
    inferer = SlidingWindowInferer(
        roi_size=(spec.roi_size[0], spec.roi_size[1], 1),
        sw_batch_size=spec.sw_batch_size,
        overlap=(spec.overlap, spec.overlap, 0.0),
        mode=spec.blend_mode,
        padding_mode="constant",
        cval=float(image.min()),
    )
    network = _SliceNetwork(bundle.network)
    with bundle.lock, torch.inference_mode():
        batch = image.as_tensor()[None].to(bundle.device)
        logits = inferer(batch, network)
        probs = torch.softmax(logits.float(), dim=1)[0].cpu()
    return MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations)


def labels_on_source_grid(probs: MetaTensor, model_input: ModelInput) -> np.ndarray:
    """Invert the preprocessing for the probabilities; labels in (slice, row, col) order, uint8."""
    data = dict(model_input.data)
    data["pred"] = probs
    inverted = Invertd(keys="pred", transform=model_input.transforms, orig_keys="image",
                       nearest_interp=False, to_tensor=True)(data)
    labels_ijk = torch.argmax(inverted["pred"], dim=0).numpy().astype(np.uint8)
    return labels_ijk.transpose(2, 1, 0).copy()


def segment_stack(stack: StackVolume, bundle: ModelBundle, model_input: ModelInput | None = None) -> np.ndarray:
    """Labels of one stack on its source grid, (slice, row, col), post-processed as the bundle says."""
    model_input = model_input or to_model_space(stack, bundle)
    probs = infer_probabilities(model_input, bundle)
    labels = labels_on_source_grid(probs, model_input)
    return postprocess_labels(labels, bundle.postprocessing)
