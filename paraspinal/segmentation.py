"""Model inference on one stack: model space in, labels on the source grid out.

Slices are segmented in 2D by MONAI's sliding-window inferer with a (H, W, 1) window, so
many slices go through the network in one batch; class probabilities are mapped back to
the source grid with MONAI's ``Invertd`` (the exact inverse of the preprocessing), and the
label is the arg-max there, so the mask follows the source pixels rather than the 1 mm grid.

Speed (``benchmarks/``, history in ``benchmarks/results/history.md``), each step giving
exactly the labels of the straightforward code it replaces (``tests/test_benchmarks_equivalence.py``):

* mapping back and arg-max (:func:`_inverse_argmax`): MONAI's ``Invertd`` resamples all classes at
  once in float64 (about 1.4 GB for 512 x 512 x 50) before the arg-max; here the same resampling
  grid is applied class by class, only where a label other than background is possible, and the
  arg-max is kept as it goes;
* the post-processing (:func:`paraspinal.postprocess.clean_labels`, shared with training and
  evaluation) runs on each label's bounding box, not on the whole volume once per label;
* where ``Invertd`` is still used, the arg-max runs class by class (:func:`_argmax_channels`),
  not as one strided reduction over a (C, I, J, K) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, Invertd
from scipy import ndimage

from paraspinal.model_bundle import ModelBundle, PreprocessingSpec
from paraspinal.postprocess import postprocess_labels
from paraspinal.preprocessing import (as_metatensor, lps_affine_to_ras, model_space_transforms,
                                      with_neighbour_slices)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W, 1) -> (B, C, H, W, 1)
        return self.network(x[..., 0]).unsqueeze(-1)


@dataclass
class SliceUncertainty:
    """Per-slice outline uncertainty of each label, in the source stack's slice order.

    Attributes:
        mirror_disagreement: label -> one value per source slice: 1 - Dice between the arg-max
            of the plain and of the mirrored (label-swapped) prediction on that slice (0: the two
            agree exactly, 1: no overlap); ``None`` where neither predicts the label, and for
            every slice when the bundle does not use test-time mirroring.
        entropy: label -> mean normalised predictive entropy (0..1) of the final probabilities
            inside the predicted label on that slice; ``None`` where it is not predicted.
    """

    mirror_disagreement: dict[int, list[float | None]]
    entropy: dict[int, list[float | None]]


def _side_partner_permutation(bundle: ModelBundle) -> list[int]:
    """Channel order that swaps every right label with its left partner (background stays 0)."""
    perm = list(range(bundle.num_classes))
    by_key = {(info.muscle, info.side): info.value for info in bundle.labels}
    for info in bundle.labels:
        other = {"right": "left", "left": "right"}.get(info.side)
        if other and (info.muscle, other) in by_key:
            perm[info.value] = by_key[(info.muscle, other)]
    return perm


def _slice_stats(plain: torch.Tensor, mirrored: torch.Tensor | None, probs: torch.Tensor,
                 labels: list[int]) -> tuple[dict[int, list[float | None]], dict[int, list[float | None]]]:
    """Per model-space slice (axis K) statistics of (C, I, J, K) probabilities (see SliceUncertainty)."""
    num_classes = probs.shape[0]
    entropy = -(probs.clamp_min(1e-8) * probs.clamp_min(1e-8).log()).sum(0) / float(np.log(num_classes))
    final = probs.argmax(0)
    a = plain.argmax(0)
    b = mirrored.argmax(0) if mirrored is not None else None
    disagreement: dict[int, list[float | None]] = {}
    mean_entropy: dict[int, list[float | None]] = {}
    for c in labels:
        mask = final == c
        n = mask.sum((0, 1))
        h = (entropy * mask).sum((0, 1))
        mean_entropy[c] = [round(float(h[k] / n[k]), 4) if n[k] > 0 else None for k in range(probs.shape[-1])]
        if b is None:
            disagreement[c] = [None] * probs.shape[-1]
            continue
        in_a, in_b = a == c, b == c
        inter = (in_a & in_b).sum((0, 1))
        total = in_a.sum((0, 1)) + in_b.sum((0, 1))
        disagreement[c] = [round(1.0 - 2.0 * float(inter[k]) / float(total[k]), 4) if total[k] > 0 else None
                           for k in range(probs.shape[-1])]
    return disagreement, mean_entropy


def infer_probabilities(model_input: ModelInput, bundle: ModelBundle) -> MetaTensor:
    """Softmax class probabilities in model space, (C, I, J, K); averaged with the mirrored,
    label-swapped prediction when the bundle asks for test-time mirroring."""
    return infer_with_uncertainty(model_input, bundle)[0]


def infer_with_uncertainty(model_input: ModelInput, bundle: ModelBundle) -> tuple[MetaTensor, SliceUncertainty]:
    """Softmax class probabilities in model space, (C, I, J, K), and their per-slice uncertainty.

    With ``bundle.test_time_mirror`` the network also sees the slice mirrored left-right (voxel
    axis I of the RAS model space); its right/left channels are swapped back and the two
    softmax maps averaged. Uncertainty slices are in the source stack's order (the model space
    may run the other way along the slice axis).
    """
    spec = bundle.preprocessing
    image = model_input.data["image"]
    pixels, window = _padded_to_window(image.as_tensor(), spec)
    inferer = SlidingWindowInferer(
        roi_size=(spec.roi_size[0], spec.roi_size[1], 1),
        sw_batch_size=spec.sw_batch_size,
        overlap=(spec.overlap, spec.overlap, 0.0),
        mode=spec.blend_mode,
        padding_mode="constant",  # "minimum" bundles: the inferer pads; otherwise already padded
        cval=float(image.min()),
    )
    network = _SliceNetwork(bundle.network)
    with bundle.lock, torch.inference_mode():
        # 2.5D bundles see the neighbour slices as channels; the window stays one slice deep.
        batch = with_neighbour_slices(pixels, spec.context_slices)[None].to(bundle.device)
        plain = torch.softmax(inferer(batch, network).float(), dim=1)[0].cpu()[window]
        mirrored = None
        if bundle.test_time_mirror:
            flipped = torch.softmax(inferer(torch.flip(batch, dims=(2,)), network).float(), dim=1)[0].cpu()
            mirrored = torch.flip(flipped, dims=(1,))[_side_partner_permutation(bundle)][window]
            del flipped
    probs = plain if mirrored is None else (plain + mirrored) / 2.0
    disagreement, entropy = _slice_stats(plain, mirrored, probs, [info.value for info in bundle.labels])
    if _slice_axis_reversed(model_input):
        disagreement = {c: v[::-1] for c, v in disagreement.items()}
        entropy = {c: v[::-1] for c, v in entropy.items()}
    return (MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations),
            SliceUncertainty(disagreement, entropy))


def _padded_to_window(image: torch.Tensor, spec: PreprocessingSpec) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``image`` (C, I, J, K) padded in-plane (axes I, J) to at least the inferer's window as
    ``spec.padding`` prescribes, and the index that cuts the (C, I, J, K) output back to it.

    "minimum" leaves the padding to the inferer (constant, the volume minimum: what bundles up
    to 0.5.0 were measured with). "reflect" and "replicate" pad here with numpy, because torch's
    (and so MONAI's) reflection refuses a pad wider than the image, which a small field of view
    needs (e.g. 160 -> 256 voxels); numpy repeats the reflection.
    """
    full = (slice(None),) * 4
    if spec.padding == "minimum":
        return image, full
    pads = [(0, 0)]
    for size, roi in zip(image.shape[1:3], spec.roi_size):
        missing = max(0, roi - size)
        pads.append((missing // 2, missing - missing // 2))  # centred, as the inferer pads
    pads.append((0, 0))
    if not any(before or after for before, after in pads):
        return image, full
    mode = {"reflect": "reflect", "replicate": "edge"}[spec.padding]
    padded = torch.from_numpy(np.pad(image.numpy(), pads, mode=mode))
    window = (slice(None),) + tuple(slice(before, before + size)
                                    for (before, _), size in zip(pads[1:3], image.shape[1:3])) + (slice(None),)
    return padded, window


def _slice_axis_reversed(model_input: ModelInput) -> bool:
    """True when the model space's slice axis (K) runs against the source stack's slice order
    (the reorientation to RAS flipped it)."""
    from monai.utils import TraceKeys

    image = model_input.data["image"]
    for op in getattr(image, "applied_operations", []):
        if op.get(TraceKeys.CLASS_NAME) == "Orientation":
            source = np.asarray(op[TraceKeys.EXTRA_INFO]["original_affine"], dtype=np.float64)
            break
    else:
        return False
    model = np.asarray(image.affine, dtype=np.float64)
    return float(np.dot(source[:3, 2], model[:3, 2])) < 0


def _argmax_channels(scores: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(scores, dim=0)`` (first index among equal maxima), channel by channel:
    C passes over contiguous memory instead of one strided reduction."""
    if scores.shape[0] == 0 or torch.isnan(scores).any():
        return torch.argmax(scores, dim=0)  # NaN handling as torch defines it
    best = scores[0].clone()
    index = torch.zeros(scores.shape[1:], dtype=torch.int64)
    for c in range(1, scores.shape[0]):
        better = scores[c] > best
        index[better] = c
        torch.maximum(best, scores[c], out=best)
    return index


def labels_on_source_grid(probs: MetaTensor, model_input: ModelInput) -> np.ndarray:
    """Invert the preprocessing for the probabilities; labels in (slice, row, col) order, uint8.

    The label of a voxel is the arg-max of the probabilities that MONAI's ``Invertd`` gives
    there. :func:`_inverse_argmax` computes the same numbers class by class (one resampling grid
    for all classes, never all the classes resampled in float64 at once); any transform chain it
    does not know goes through ``Invertd`` itself.
    """
    labels_ijk = _inverse_argmax(probs, model_input)
    if labels_ijk is None:
        data = dict(model_input.data)
        data["pred"] = probs
        inverted = Invertd(keys="pred", transform=model_input.transforms, orig_keys="image",
                           nearest_interp=False, to_tensor=True)(data)
        pred = inverted["pred"]
        labels_ijk = _argmax_channels(pred.as_tensor() if isinstance(pred, MetaTensor) else pred).numpy()
    return labels_ijk.astype(np.uint8).transpose(2, 1, 0).copy()


def _inverse_argmax(probs: MetaTensor, model_input: ModelInput) -> np.ndarray | None:
    """Arg-max over classes of the probabilities mapped back by the inverse of the preprocessing
    (``Orientation`` then ``Spacing``: in reverse, the resampling, then the reorientation), as
    ``Invertd`` + ``torch.argmax`` would give it, (I, J, K) uint8; ``None`` when the image's
    transforms are not exactly that pair (the caller then uses ``Invertd``).

    The resampling is MONAI's ``spatial_resample`` -> ``AffineTransform`` path step by step (same
    affine algebra, same ``affine_grid``, same ``grid_sample`` in the recorded dtype, float32
    result), with the one grid applied to one class at a time; ``grid_sample`` interpolates each
    class with the same weights whatever the number of classes, and the arg-max commutes with the
    reorientation, which MONAI's ``Orientation`` then applies to the labels.
    """
    from monai.config import USE_COMPILED
    from monai.data.utils import AFFINE_TOL, to_affine_nd
    from monai.networks.layers import AffineTransform
    from monai.networks.utils import to_norm_affine
    from monai.transforms.utils import resolves_modes
    from monai.utils import TraceKeys, convert_to_dst_type, convert_to_tensor, get_torch_dtype_from_string

    image = model_input.data["image"]
    ops = list(getattr(image, "applied_operations", []))
    names = [op.get(TraceKeys.CLASS_NAME) for op in ops]
    steps = model_input.transforms.transforms
    if names != ["Orientation", "SpatialResample"] or USE_COMPILED or len(steps) < 2:
        return None
    orientation_op, resample_op = ops
    info = dict(resample_op[TraceKeys.EXTRA_INFO])
    mode, padding_mode = info["mode"], info["padding_mode"]
    if isinstance(mode, int) or resample_op.get(TraceKeys.LAZY, False):
        return None
    dtype = get_torch_dtype_from_string(info["dtype"])
    align_corners = False if info.get("align_corners") == TraceKeys.NONE else info.get("align_corners")
    spatial_size = torch.as_tensor(resample_op[TraceKeys.ORIG_SIZE])

    # monai.transforms.spatial.functional.spatial_resample, as SpatialResample.inverse calls it
    src_affine = to_affine_nd(3, probs.peek_pending_affine()).to(torch.float64)
    dst_affine = convert_to_dst_type(to_affine_nd(3, info["src_affine"]), src_affine)[0]
    xform = np.linalg.solve(src_affine.numpy(), dst_affine.numpy())
    xform = convert_to_tensor(to_affine_nd(3, xform)).to(dtype=torch.float64)
    same_size = bool(torch.equal(spatial_size, torch.tensor(probs.shape[1:4])))
    if same_size and (bool(torch.allclose(src_affine, dst_affine, atol=AFFINE_TOL))
                      or bool(torch.allclose(xform, torch.eye(4, dtype=torch.float64), atol=AFFINE_TOL))):
        return None  # MONAI would not resample at all
    _, grid_mode, grid_padding, _ = resolves_modes(mode, padding_mode)
    warp = AffineTransform(normalized=False, mode=grid_mode, padding_mode=grid_padding, align_corners=align_corners,
                           reverse_indexing=True)
    # AffineTransform.forward, up to its grid
    theta = xform.to(dtype)[None].clone()
    src_size = tuple(probs.shape[1:4])
    dst_size = tuple(int(v) for v in spatial_size)
    theta = to_norm_affine(affine=theta, src_size=src_size, dst_size=dst_size, align_corners=warp.align_corners,
                           zero_centered=warp.zero_centered)
    rev_idx = torch.as_tensor(range(2, -1, -1))
    theta[:, :3] = theta[:, rev_idx]
    theta[:, :, :3] = theta[:, :, rev_idx]
    grid = F.affine_grid(theta=theta[:, :3], size=[1, 1, *dst_size], align_corners=warp.align_corners)
    source = probs.as_tensor()
    if torch.isnan(source).any():
        return None
    # Only voxels that can get a label other than background are resampled. A voxel whose
    # interpolation neighbours all have background as (one of) their most probable class(es)
    # gets background: its interpolated probabilities are the same non-negative weights times
    # the same neighbours for every class, in the same order, and rounding is monotonic, so
    # background stays >= every class there, and the arg-max takes the first of equal maxima.
    candidates = _foreground_candidates(source, grid, warp.padding_mode, warp.align_corners)
    index = torch.zeros(dst_size, dtype=torch.uint8)
    if candidates is None:  # reflection padding: neighbours anywhere; resample everything
        points, where = grid, None
    elif not candidates.any():
        points = where = None
    else:
        where = torch.from_numpy(candidates)
        points = grid[0][where][None, None, None]  # (1, 1, 1, M, 3)
    best = None
    for c in range(source.shape[0] if points is not None else 0):
        channel = source[c:c + 1].to(dtype).unsqueeze(0).contiguous()
        values = F.grid_sample(input=channel, grid=points, mode=warp.mode, padding_mode=warp.padding_mode,
                               align_corners=warp.align_corners).reshape(-1).to(torch.float32)
        if best is None:
            best, chosen = values, torch.zeros(values.shape, dtype=torch.uint8)
            continue
        better = values > best
        chosen[better] = c
        torch.maximum(best, values, out=best)
    if points is not None and where is None:
        index = chosen.reshape(dst_size)
    elif points is not None:
        index[where] = chosen
    del grid, points, best
    # the reorientation, by MONAI, on the labels (pure indexing: flips and axis swaps)
    labels = MetaTensor(index[None], affine=dst_affine)
    orientation = steps[0]
    orientation_transform = getattr(orientation, "ornt_transform", orientation)
    labels.push_applied_operation(orientation_op)
    oriented = orientation_transform.inverse(labels)
    return np.asarray(oriented.as_tensor()[0].numpy())


def _foreground_candidates(probs: torch.Tensor, grid: torch.Tensor, padding_mode: str,
                           align_corners: bool) -> np.ndarray | None:
    """Output voxels (bool, the grid's spatial shape) that may take a label other than
    background: those whose source position (clamped into the volume) lies within two voxels of a
    voxel where some class is strictly more probable than background. Two voxels cover both
    interpolation neighbours (floor and floor + 1) with a voxel to spare for rounding. ``None``
    for reflection padding."""
    if padding_mode not in ("zeros", "border"):
        return None
    foreground = (probs[1:] > probs[0:1]).any(dim=0).numpy()  # (I, J, K)
    if not foreground.any():
        return np.zeros(grid.shape[1:4], dtype=bool)
    near = ndimage.maximum_filter(foreground.view(np.uint8), size=5, mode="constant").astype(bool)
    sizes = foreground.shape[::-1]  # grid's last axis: x -> K, y -> J, z -> I
    out = np.empty(grid.shape[1:4], dtype=bool)
    rows = 16
    for start in range(0, grid.shape[1], rows):
        g = grid[0, start:start + rows].numpy()
        index = []
        for axis, size in enumerate(sizes):
            coord = ((g[..., axis] + 1.0) * size - 1.0) / 2.0 if not align_corners \
                else (g[..., axis] + 1.0) / 2.0 * (size - 1)
            index.append(np.floor(np.clip(coord, 0.0, size - 1.0)).astype(np.intp))
        out[start:start + rows] = near[index[2], index[1], index[0]]
    return out


def segment_stack(stack: StackVolume, bundle: ModelBundle, model_input: ModelInput | None = None) -> np.ndarray:
    """Labels of one stack on its source grid, (slice, row, col), post-processed as the bundle says."""
    return segment_stack_with_uncertainty(stack, bundle, model_input)[0]


def segment_stack_with_uncertainty(stack: StackVolume, bundle: ModelBundle, model_input: ModelInput | None = None
                                   ) -> tuple[np.ndarray, SliceUncertainty]:
    """:func:`segment_stack` plus the per-slice outline uncertainty of each label."""
    model_input = model_input or to_model_space(stack, bundle)
    probs, uncertainty = infer_with_uncertainty(model_input, bundle)
    labels = labels_on_source_grid(probs, model_input)
    return postprocess_labels(labels, bundle.postprocessing), uncertainty
