"""Base class of the pipeline stages: one study in, the same study out.

Each stage receives a :class:`StudyJob` on port ``study``, does its work only while the job
is still active (no earlier stage failed or ended it), records the stage's time and any
exception as the study's failure, and passes the job on, so one bad study never stops the
application and its reason reaches the results writer.
"""

from __future__ import annotations

import logging

from monai.deploy.core import Operator, OperatorSpec

from paraspinal.study_job import StudyJob


class StudyStageOperator(Operator):
    """Subclasses set ``stage`` (the name used in timings and failure reports) and define
    ``process(job: StudyJob) -> None``, which does the stage's work on an active job."""

    stage: str = ""

    def __init__(self, fragment, *args, **kwargs) -> None:
        self._logger = logging.getLogger(f"{type(self).__module__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        job: StudyJob = op_input.receive("study")
        if job.active:
            with job.stage(self.stage):
                self.process(job)
        op_output.emit(job, "study")
