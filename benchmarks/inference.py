"""Inference time per series, in-process: CPU always, GPU when ``torch.cuda.is_available()``.

For each series: the preprocessing (``to_model_space``), the network over all slices
(``infer_probabilities``: MONAI sliding window / single-window path, softmax) and the whole
segmentation step (``segment_stack``: network, inverse resampling to the source grid, arg-max,
post-processing), each the median of ``repeats`` runs after two warm-up runs (TorchScript's
profiling executor optimises the graph during the first calls).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from app.config import load_config
from benchmarks.data import BenchStudy
from benchmarks.machine import load_average
from paraspinal.dicom_index import index_folder
from paraspinal.model_bundle import load_bundle
from paraspinal.segmentation import infer_probabilities, segment_stack, to_model_space
from paraspinal.series_selection import select_series
from paraspinal.stacks import load_stack


def load_volumes(study: BenchStudy) -> list:
    """The stacks of the series the node would choose in ``study``."""
    config = load_config(environ={})
    record = next(iter(index_folder(study.folder).studies.values()))
    chosen = select_series(record, config.selection).chosen
    if chosen is None:
        raise ValueError(f"{study.name}: no series chosen")
    return [load_stack(plan, chosen.series_uid, i) for i, plan in enumerate(chosen.stacks or [], start=1)]


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_series(study: BenchStudy, model: Path, device: str, repeats: int, profile_dir: Path | None = None) -> dict:
    """Median seconds of preprocessing, network and whole segmentation of each stack of ``study``."""
    bundle = load_bundle(model, device)
    rows = []
    for volume in load_volumes(study):
        model_input = to_model_space(volume, bundle)
        image = model_input.data["image"]
        roi = bundle.preprocessing.roi_size
        windows = (1 if image.shape[1] <= roi[0] and image.shape[2] <= roi[1] else None)
        load_before = load_average()
        for _ in range(2):  # warm-up
            infer_probabilities(model_input, bundle)
        times = {"preprocess": [], "network": [], "segment_stack": []}
        for _ in range(repeats):
            times["preprocess"].append(_timed(lambda: to_model_space(volume, bundle), bundle.device))
            times["network"].append(_timed(lambda: infer_probabilities(model_input, bundle), bundle.device))
            times["segment_stack"].append(_timed(lambda: segment_stack(volume, bundle, model_input), bundle.device))
        row = {
            "series": study.name, "stack": volume.index, "description": study.description,
            "source_shape": list(volume.pixels.shape), "model_space_shape": list(image.shape[1:]),
            "windows_per_slice": windows or "several (MONAI sliding window)",
            "device": str(bundle.device), "torch_threads": torch.get_num_threads(), "repeats": repeats,
            **{f"{k}_median_s": round(statistics.median(v), 3) for k, v in times.items()},
            **{f"{k}_runs_s": [round(x, 3) for x in v] for k, v in times.items()},
            "network_per_slice_ms": round(1000 * statistics.median(times["network"]) / volume.n_slices, 1),
            "load_average_before": load_before, "load_average_after": load_average(),
        }
        if profile_dir is not None:
            row["torch_profile"] = str(torch_profile(model_input, bundle, profile_dir, f"{study.name}_{device}"))
        rows.append(row)
    return {"series": study.name, "device": device, "stacks": rows}


def torch_profile(model_input, bundle, out_dir: Path, name: str) -> Path:
    """The torch profiler's operator table for one ``infer_probabilities`` call, as a text file."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bundle.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function("infer_probabilities"):
            infer_probabilities(model_input, bundle)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"torch_profile_{name}.txt"
    sort = "cuda_time_total" if bundle.device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    return path
