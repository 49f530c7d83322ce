"""SEG writer: one BINARY DICOM Segmentation per stack, built with highdicom."""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.config import OutputSettings
from paraspinal.dicom_outputs import build_segmentation
from paraspinal.model_bundle import ModelBundle
from paraspinal.study_job import StudyJob


class SegWriterOperator(Operator):
    """Builds the SEG of each stack: a segment per found muscle and side, SNOMED CT codes with
    laterality and colours from the bundle, frames referencing the exact source instances.

    Input/Output:
        study: StudyJob (each stack's ``segmentation`` filled)
    """

    def __init__(self, fragment: Fragment, *args, bundle: ModelBundle, settings: OutputSettings, **kwargs) -> None:
        self.bundle = bundle
        self.settings = settings
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        job: StudyJob = op_input.receive("study")
        if job.active:
            with job.stage("seg_encode"):
                for work in job.stacks:
                    work.segmentation = build_segmentation(work.volume, work.labels, self.bundle, self.settings)
        op_output.emit(job, "study")
