"""Preprocess: put each stack into the model's space as the bundle prescribes."""

from __future__ import annotations

from monai.deploy.core import Fragment

from operators.study_stage import StudyStageOperator
from paraspinal.model_bundle import ModelBundle
from paraspinal.segmentation import to_model_space
from paraspinal.study_job import StudyJob


class PreprocessOperator(StudyStageOperator):
    """Orientation, in-plane resampling and intensity normalisation from the bundle metadata;
    keeps the invertible transforms so predictions map back to the source grid.

    Input/Output:
        study: StudyJob (each stack's ``model_input`` filled)
    """

    stage = "preprocess"

    def __init__(self, fragment: Fragment, *args, bundle: ModelBundle, **kwargs) -> None:
        self.bundle = bundle
        super().__init__(fragment, *args, **kwargs)

    def process(self, job: StudyJob) -> None:
        for work in job.stacks:
            work.model_input = to_model_space(work.volume, self.bundle)
