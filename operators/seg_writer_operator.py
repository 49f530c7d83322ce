"""SEG writer: one BINARY DICOM Segmentation per stack, built with highdicom."""

from __future__ import annotations

from monai.deploy.core import Fragment

from operators.study_stage import StudyStageOperator
from paraspinal.dicom_outputs import build_segmentation
from paraspinal.model_bundle import ModelBundle
from paraspinal.settings import OutputSettings
from paraspinal.study_job import StudyJob


class SegWriterOperator(StudyStageOperator):
    """Builds the SEG of each stack: a segment per found muscle and side, SNOMED CT codes with
    laterality and colours from the bundle, frames referencing the exact source instances.

    Input/Output:
        study: StudyJob (each stack's ``segmentation`` filled)
    """

    stage = "seg_encode"

    def __init__(self, fragment: Fragment, *args, bundle: ModelBundle, settings: OutputSettings, **kwargs) -> None:
        self.bundle = bundle
        self.settings = settings
        super().__init__(fragment, *args, **kwargs)

    def process(self, job: StudyJob) -> None:
        for work in job.stacks:
            work.segmentation = build_segmentation(work.volume, work.labels, self.bundle, self.settings)
