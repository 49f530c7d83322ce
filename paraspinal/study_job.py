"""The unit of work that flows through the operator graph: one study.

Each operator fills in its part. A stage that fails marks the job failed with the reason and
later stages pass it through untouched, so one bad study never stops the application and its
reason always reaches the results folder.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator

import numpy as np

from paraspinal.dicom_index import FileProblem, StudyRecord
from paraspinal.dicom_outputs import SegmentationResult
from paraspinal.quantification import MuscleMeasurement
from paraspinal.segmentation import ModelInput, SliceUncertainty
from paraspinal.series_selection import StudySelection
from paraspinal.stacks import STOP_EXCEPTIONS, StackVolume


class JobStatus(str, Enum):
    PENDING = "pending"
    DONE = "done"
    NO_SUITABLE_SERIES = "no_suitable_series"
    FAILED = "failed"


@dataclass
class StackWork:
    """Everything computed for one stack of the chosen series."""

    volume: StackVolume
    model_input: ModelInput | None = None
    labels: np.ndarray | None = None  # (slice, row, col) on the source grid
    uncertainty: SliceUncertainty | None = None  # per-slice outline uncertainty (quality control)
    measurements: list[MuscleMeasurement] = field(default_factory=list)
    segmentation: SegmentationResult | None = None


@dataclass
class StudyJob:
    study: StudyRecord
    input_problems: list[FileProblem] = field(default_factory=list)
    selection: StudySelection | None = None
    stacks: list[StackWork] = field(default_factory=list)
    sr: Any = None  # pydicom Dataset of the measurement report
    viewer_sr: Any = None  # pydicom Dataset of the outlines-only report for viewers (OHIF)
    report: Any = None  # operators.report_operator.StudyReport (PDF bytes + Encapsulated PDF)
    status: JobStatus = JobStatus.PENDING
    reason: str = ""
    failed_stage: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def study_uid(self) -> str:
        return self.study.study_uid

    @property
    def active(self) -> bool:
        """True while no stage has ended the job (failed or nothing to analyse)."""
        return self.status is JobStatus.PENDING

    def fail(self, stage: str, reason: str) -> None:
        self.status, self.failed_stage, self.reason = JobStatus.FAILED, stage, reason

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage and turn any exception into a recorded failure of this study.

        Also catches what derives from ``BaseException`` only, such as pyo3's
        ``PanicException`` (a Rust codec's panic), so one malformed study cannot end a batch;
        KeyboardInterrupt, SystemExit and GeneratorExit still end the application."""
        start = time.perf_counter()
        try:
            yield
        except STOP_EXCEPTIONS:
            raise
        except BaseException as exc:  # one study's failure must not stop the application
            self.fail(name, f"{type(exc).__name__}: {exc}")
        finally:
            self.timings_s[name] = round(self.timings_s.get(name, 0.0) + time.perf_counter() - start, 3)
