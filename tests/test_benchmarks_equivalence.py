"""The speed-ups measured in ``benchmarks/`` give exactly what the code they replace gave.

Each optimised function is compared with the straightforward reference it replaces (MONAI's
``Invertd`` with ``torch.argmax``, the whole-volume label clean-up, scipy's hole filling, highdicom's SR
constructor on the complete content): bit for bit, on small inputs, including the edge cases
(ties, holes at the border, flipped, oblique and non-square geometry).
No timing is asserted anywhere.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.transforms import Invertd
from scipy import ndimage as ndi

from benchmarks.parts import reference_clean_labels
from dicom_validators import bytes_without_dates
from paraspinal import dicom_outputs, segmentation
from paraspinal.fat_methods import body_mask, fill_holes, otsu_threshold
from paraspinal.model_bundle import PostprocessingSpec, PreprocessingSpec
from paraspinal.postprocess import clean_labels, postprocess_labels

SPEC = PreprocessingSpec(orientation="RAS", pixdim_mm=(1.0, 1.0), intensity="zscore_nonzero", roi_size=(32, 32),
                         overlap=0.25, blend_mode="gaussian", sw_batch_size=4)


def test_argmax_channels_equals_torch_argmax_with_ties():
    torch.manual_seed(2)
    scores = torch.randint(0, 4, (6, 9, 8, 5)).float()  # many ties: the first index must win
    assert torch.equal(segmentation._argmax_channels(scores), torch.argmax(scores, dim=0))
    scores[2, 0, 0, 0] = float("nan")
    assert torch.equal(segmentation._argmax_channels(scores), torch.argmax(scores, dim=0))


def _random_labels(rng, shape, n_labels=5):
    labels = np.zeros(shape, dtype=np.uint8)
    for value in range(1, n_labels + 1):
        for _ in range(3):  # several blobs per label, some touching the border, some with holes
            centre = [rng.integers(0, s) for s in shape]
            radius = rng.integers(1, 6)
            zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
            distance2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
            blob = distance2 <= radius ** 2
            ring = blob & ~(distance2 <= (radius - 1.5) ** 2)
            labels[(ring if rng.random() < 0.5 else blob) & (labels == 0)] = value
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_clean_labels_in_boxes_equals_whole_volume(seed):
    rng = np.random.default_rng(seed)
    labels = _random_labels(rng, (6, 40, 37))
    for spec in (PostprocessingSpec(True, True), PostprocessingSpec(True, False), PostprocessingSpec(False, True),
                 PostprocessingSpec(False, False)):
        expected = reference_clean_labels(labels, spec.largest_component_3d, spec.fill_holes)
        assert np.array_equal(postprocess_labels(labels, spec), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.uint64])
def test_clean_labels_in_boxes_equals_whole_volume_for_other_label_types(dtype):
    """Training and evaluation pass int64 (and other) label volumes; negative or large values take
    the ``np.unique`` path, which must agree too."""
    rng = np.random.default_rng(11)
    base = _random_labels(rng, (5, 30, 28)).astype(dtype)
    variants = [base, base * 3]
    if np.dtype(dtype).kind == "i":
        variants.append(np.where(base == 2, -2, base).astype(dtype))  # a negative label
    if np.dtype(dtype).itemsize >= 2:
        variants.append(np.where(base == 4, 5000, base).astype(dtype))  # beyond the find_objects limit
    for labels in variants + [np.zeros((3, 4, 5), dtype), np.zeros((0, 4, 5), dtype)]:
        for flags in ((True, True), (True, False), (False, True)):
            out = clean_labels(labels, *flags)
            assert out.dtype == labels.dtype
            assert np.array_equal(out, reference_clean_labels(labels, *flags))


def test_fill_holes_equals_scipy():
    rng = np.random.default_rng(3)
    for _ in range(400):
        shape = tuple(int(v) for v in rng.integers(1, 30, size=2))
        mask = rng.random(shape) < rng.uniform(0.3, 0.95)
        if rng.random() < 0.5:
            mask = ndi.binary_closing(mask, iterations=2)
        assert np.array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
    for mask in (np.zeros((6, 5), bool), np.ones((6, 5), bool)):
        assert np.array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))


def test_body_mask_equals_the_scipy_formulation():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:96, :80]
    image = 100.0 * ((yy - 48) ** 2 / 40 ** 2 + (xx - 40) ** 2 / 30 ** 2 < 1) + rng.normal(0, 8, (96, 80))
    image[40:50, 30:38] = 5.0  # a dark hole inside the body
    t = otsu_threshold(image.ravel())
    mask = ndi.binary_fill_holes(ndi.binary_closing(image > 0.5 * t, iterations=3))
    lab, _ = ndi.label(mask)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    assert np.array_equal(body_mask(image), lab == int(np.argmax(sizes)))


def _stack(shape_src, affine_lps):
    pixels = np.random.default_rng(5).uniform(1, 100, size=shape_src).astype(np.float32)
    return SimpleNamespace(pixels=pixels, affine_lps=np.asarray(affine_lps, dtype=np.float64))


def _affine(spacing=(0.7, 0.9), step=3.0, flip=False, tilt_deg=0.0):
    t = np.radians(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(t), np.sin(t)])
    normal = np.cross(row_dir, col_dir)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1] * (-1 if flip else 1)
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = normal * step * (-1 if flip else 1)
    affine[:3, 3] = [-20.0, -15.0, 10.0]
    return affine


@pytest.mark.parametrize("geometry", [dict(), dict(flip=True), dict(tilt_deg=12.0), dict(spacing=(1.3, 0.6))])
def test_inverse_argmax_equals_invertd(geometry):
    stack = _stack((4, 30, 26), _affine(**geometry))  # (slice, row, col)
    model_input = segmentation.to_model_space(stack, SimpleNamespace(preprocessing=SPEC))
    image = model_input.data["image"]
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn((5, *image.shape[1:]), generator=generator)
    logits = torch.nn.functional.avg_pool3d(logits[None], 3, stride=1, padding=1)[0] * 4  # smooth, with regions
    logits[1:] -= 1.5  # mostly background, as in a real image
    probs = segmentation.MetaTensor(torch.softmax(logits, dim=0), meta=image.meta,
                                    applied_operations=image.applied_operations)
    data = dict(model_input.data, pred=probs)
    inverted = Invertd(keys="pred", transform=model_input.transforms, orig_keys="image", nearest_interp=False,
                       to_tensor=True)(data)
    reference = torch.argmax(inverted["pred"].as_tensor(), dim=0).numpy().astype(np.uint8).transpose(2, 1, 0)
    fast = segmentation.labels_on_source_grid(probs, model_input)
    assert segmentation._inverse_argmax(probs, model_input) is not None  # the fast path was taken
    assert fast.shape == stack.pixels.shape
    assert 0 < (reference > 0).mean() < 0.9
    assert np.array_equal(fast, reference)



def test_sr_light_content_path_equals_highdicom_full_content(tmp_path, bundle, config):
    from paraspinal.dicom_index import index_folder
    from paraspinal.quantification import measure_stack
    from paraspinal.series_selection import select_series
    from paraspinal.stacks import load_stack
    from paraspinal.synthetic_study import make_synthetic_study

    study = make_synthetic_study(tmp_path / "study", seed=21, rows=96, cols=96, n_slices=5, include_distractors=False)
    record = next(iter(index_folder(tmp_path / "study").studies.values()))
    chosen = select_series(record, config.selection).chosen
    stack = load_stack(chosen.stacks[0], chosen.series_uid, 1)
    labels = study.stacks[0].labels.copy()
    labels[labels > 8] = 0
    measures = measure_stack(stack, labels, bundle.labels, "signal_fraction", 20)
    seg = dicom_outputs.build_segmentation(stack, labels, bundle, config.output)
    results = [(stack, seg, measures)]
    fast = dicom_outputs.build_measurement_report(results, bundle, config.output)
    reference = dicom_outputs.build_measurement_report(results, bundle, config.output, light_content=False)
    assert len(fast.ContentSequence) == len(reference.ContentSequence)
    assert bytes_without_dates(fast) == bytes_without_dates(reference)
