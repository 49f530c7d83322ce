"""Each optimisation against the code it replaced, on the same data, alternating (suite ``parts``).

The replaced code is still in the tree as the reference each optimisation is tested against
(``tests/test_benchmarks_equivalence.py``): ``Invertd`` with ``torch.argmax``, the whole-volume
label clean-up (:func:`reference_clean_labels`, here), scipy's hole filling, highdicom's SR
constructor on the complete content.
Both run on the same input, A B A B ..., and the result
says whether they agree (they must) and the median of each and of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Invertd
from scipy import ndimage as ndi

from benchmarks.data import BenchStudy
from benchmarks.inference import load_volumes
from benchmarks.machine import load_average


def reference_clean_labels(labels: np.ndarray, largest_component_3d: bool = True,
                           fill_holes: bool = True) -> np.ndarray:
    """The label clean-up as it was before the bounding-box version
    (:func:`paraspinal.postprocess.clean_labels`): each label on the whole volume. Kept only as
    the reference that version is compared with; the application does not use it."""
    from paraspinal.postprocess import fill_holes_per_slice, largest_component

    if not (largest_component_3d or fill_holes):
        return labels.copy()
    out = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        if largest_component_3d:
            mask = largest_component(mask)
        if fill_holes:
            mask = fill_holes_per_slice(mask) & ((labels == 0) | (labels == value))
        out[mask & (out == 0)] = value
    return out


def _ab(reference, optimised, rounds: int, same) -> dict:
    times = {"reference": [], "optimised": []}
    outputs = {}
    for r in range(rounds):
        order = [("reference", reference), ("optimised", optimised)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(o / r for o, r in zip(times["optimised"], times["reference"]))
    return {"reference_median_s": round(statistics.median(times["reference"]), 3),
            "optimised_median_s": round(statistics.median(times["optimised"]), 3),
            "median_ratio": round(ratio, 3), "identical": bool(same(outputs["reference"], outputs["optimised"]))}


def run_parts(study: BenchStudy, model: Path, rounds: int, log=print) -> dict:
    """Reference vs optimised code of each optimisation on ``study``'s first stack (CPU)."""
    from app.config import load_config
    from paraspinal import dicom_outputs, segmentation
    from paraspinal.fat_methods import fill_holes, otsu_threshold
    from paraspinal.model_bundle import load_bundle
    from paraspinal.postprocess import postprocess_labels
    from paraspinal.quantification import measure_stack

    bundle = load_bundle(model, "cpu")
    config = load_config(environ={})
    volume = load_volumes(study)[0]
    model_input = segmentation.to_model_space(volume, bundle)
    results: dict = {"study": study.name, "rounds": rounds, "load_average_before": load_average()}

    probs = segmentation.infer_probabilities(model_input, bundle)

    def invertd_labels():
        data = dict(model_input.data, pred=probs)
        inverted = Invertd(keys="pred", transform=model_input.transforms, orig_keys="image", nearest_interp=False,
                           to_tensor=True)(data)
        return torch.argmax(inverted["pred"].as_tensor(), dim=0).numpy().astype(np.uint8).transpose(2, 1, 0)

    results["inverse_and_argmax"] = _ab(invertd_labels, lambda: segmentation.labels_on_source_grid(probs, model_input),
                                        rounds, np.array_equal)
    log(f"  inverse + arg-max: {results['inverse_and_argmax']}")
    labels = segmentation.labels_on_source_grid(probs, model_input)
    spec = bundle.postprocessing
    results["postprocess_in_boxes"] = _ab(
        lambda: reference_clean_labels(labels, spec.largest_component_3d, spec.fill_holes),
        lambda: postprocess_labels(labels, spec), rounds, np.array_equal)
    log(f"  post-processing: {results['postprocess_in_boxes']}")
    closed = [ndi.binary_closing(s > 0.5 * (otsu_threshold(s.ravel()) or 0), iterations=3) for s in volume.pixels]
    results["fill_holes_per_body_mask"] = _ab(lambda: [ndi.binary_fill_holes(m) for m in closed],
                                              lambda: [fill_holes(m) for m in closed], rounds,
                                              lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b)))
    log(f"  fill holes: {results['fill_holes_per_body_mask']}")
    post = postprocess_labels(labels, bundle.postprocessing)
    measures = measure_stack(volume, post, bundle.labels, config.quantification.fat_method,
                             config.quantification.min_muscle_voxels, bias_correction="none")
    seg = dicom_outputs.build_segmentation(volume, post, bundle, config.output)
    sr_inputs = [(volume, seg, measures)]

    def sr(light: bool):
        return dicom_outputs.build_measurement_report(sr_inputs, bundle, config.output, light_content=light)

    results["sr_light_content"] = _ab(lambda: sr(False), lambda: sr(True), max(1, rounds),
                                      lambda a, b: len(a.ContentSequence) == len(b.ContentSequence))
    results["sr_light_content"]["identical"] = ("byte-identical: tests/test_benchmarks_equivalence.py "
                                                "(UIDs differ per run)")
    log(f"  SR light content: {results['sr_light_content']}")
    results["load_average_after"] = load_average()
    return results
