"""The pipeline's stages in-process, without the Holoscan scheduler, for timing and profiling.

Each stage calls the operator's own ``process`` (``operators/``) on a stand-in ``self`` that
carries the same attributes the operator gets from ``app.application`` (bundle, settings), so
the code timed here is the code the node runs; only the graph plumbing is left out.
"""

from __future__ import annotations

import functools
import inspect
import logging
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from app.config import Config, load_config
from paraspinal.dicom_index import index_folder
from paraspinal.model_bundle import ModelBundle, load_bundle
from paraspinal.study_job import JobStatus, StudyJob

STAGES = ("index", "select", "load", "preprocess", "inference", "quantification", "seg_encode", "sr_encode",
          "report")


def _stand_in(cls, **attrs) -> SimpleNamespace:
    """An object that runs ``cls``'s methods with ``attrs`` as its attributes."""
    self = SimpleNamespace(_logger=logging.getLogger(f"benchmarks.{cls.__name__}"), **attrs)
    # The operator's own helper methods (e.g. QuantificationOperator._pdff, _levels), bound to
    # the stand-in; not the Holoscan plumbing it inherits.
    for name, value in vars(cls).items():
        if inspect.isfunction(value) and name not in ("__init__", "setup", "compute", "process"):
            setattr(self, name, functools.partial(value, self))
    return self


def operators_for(bundle: ModelBundle, config: Config) -> dict[str, tuple[object, callable]]:
    """stage -> (stand-in self, the operator's process function), in pipeline order."""
    from operators.preprocess_operator import PreprocessOperator
    from operators.quantification_operator import QuantificationOperator
    from operators.report_operator import ReportOperator
    from operators.segmentation_operator import SegmentationOperator
    from operators.seg_writer_operator import SegWriterOperator
    from operators.series_selector_operator import SeriesSelectorOperator
    from operators.sr_writer_operator import SRWriterOperator

    plan = [
        ("select", SeriesSelectorOperator, dict(rules=config.selection)),
        ("preprocess", PreprocessOperator, dict(bundle=bundle)),
        ("inference", SegmentationOperator, dict(bundle=bundle)),
        ("quantification", QuantificationOperator, dict(bundle=bundle, settings=config.quantification,
                                                        quality=config.quality)),
        ("seg_encode", SegWriterOperator, dict(bundle=bundle, settings=config.output)),
        ("sr_encode", SRWriterOperator, dict(bundle=bundle, settings=config.output)),
        ("report", ReportOperator, dict(bundle=bundle, settings=config.output, quantification=config.quantification)),
    ]
    return {stage: (_stand_in(cls, **attrs), cls.process) for stage, cls, attrs in plan}


def run_stages(folder: Path, bundle: ModelBundle, config: Config | None = None) -> tuple[dict[str, float], StudyJob]:
    """Run every stage once on the (single) study in ``folder``; returns seconds per stage and the job.

    ``select`` includes ``load`` (pixel decoding) as in the node's ``result.json``; here ``load``
    is also reported alone and ``select`` excludes it.
    """
    config = config or load_config(environ={})
    times: dict[str, float] = {}
    start = time.perf_counter()
    index = index_folder(Path(folder))
    times["index"] = time.perf_counter() - start
    if len(index.studies) != 1:
        raise ValueError(f"{folder}: expected one study, found {len(index.studies)}")
    job = StudyJob(study=next(iter(index.studies.values())), input_problems=index.problems)
    for stage, (self, process) in operators_for(bundle, config).items():
        start = time.perf_counter()
        with job.stage(stage):
            process(self, job)
        times[stage] = time.perf_counter() - start
        if job.status is JobStatus.FAILED:
            raise RuntimeError(f"stage {job.failed_stage} failed: {job.reason}")
    times["load"] = job.timings_s.get("load", 0.0)
    times["select"] -= times["load"]
    return times, job


def stage_medians(folder: Path, bundle: ModelBundle, repeats: int = 3, config: Config | None = None) -> dict:
    """Median seconds per stage over ``repeats`` in-process runs (after one warm-up run)."""
    run_stages(folder, bundle, config)  # warm-up: imports, allocator, matplotlib font cache
    runs = [run_stages(folder, bundle, config)[0] for _ in range(repeats)]
    return {
        "repeats": repeats,
        "median_s": {s: round(statistics.median(r[s] for r in runs), 3) for s in STAGES},
        "runs_s": [{s: round(r[s], 3) for s in STAGES} for r in runs],
        "total_median_s": round(statistics.median(sum(r.values()) for r in runs), 3),
    }


def load_for(model_path: Path, device: str) -> ModelBundle:
    return load_bundle(Path(model_path), device)
