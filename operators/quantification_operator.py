"""Quantify: cross-sectional area, volume and fat fraction per muscle and side."""

from __future__ import annotations

from monai.deploy.core import Fragment

from app.config import QuantificationSettings
from operators.study_stage import StudyStageOperator
from paraspinal.model_bundle import ModelBundle
from paraspinal.quantification import measure_stack
from paraspinal.study_job import JobStatus, StudyJob


class QuantificationOperator(StudyStageOperator):
    """Measures each stack with the configured fat method (see :mod:`paraspinal.quantification`).

    A study in which no muscle is found at all ends as ``no_suitable_series``: the images were
    accepted by the rules but show no lumbar paraspinal muscle (wrong anatomy or failed model).

    Input/Output:
        study: StudyJob (each stack's ``measurements`` filled)
    """

    stage = "quantification"

    def __init__(self, fragment: Fragment, *args, bundle: ModelBundle, settings: QuantificationSettings,
                 **kwargs) -> None:
        self.bundle = bundle
        self.settings = settings
        super().__init__(fragment, *args, **kwargs)

    def process(self, job: StudyJob) -> None:
        for work in job.stacks:
            work.measurements = measure_stack(work.volume, work.labels, self.bundle.labels,
                                              self.settings.fat_method, self.settings.min_muscle_voxels)
        if not any(m.found for w in job.stacks for m in w.measurements):
            job.status = JobStatus.NO_SUITABLE_SERIES
            job.reason = "no paraspinal muscle found in the chosen series (not lumbar anatomy?)"
