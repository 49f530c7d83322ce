"""SR writer: one TID 1500 Measurement Report (Comprehensive 3D SR) per study."""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.config import OutputSettings
from paraspinal.dicom_outputs import build_measurement_report
from paraspinal.model_bundle import ModelBundle
from paraspinal.study_job import StudyJob


class SRWriterOperator(Operator):
    """Builds the measurement report: a volumetric group per found muscle per stack, each
    referencing its SEG segment, with volume (cm3), mean/max CSA (cm2) and fat fraction (%).

    Input/Output:
        study: StudyJob (``sr`` filled)
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
            with job.stage("sr_encode"):
                results = [(w.volume, w.segmentation, w.measurements) for w in job.stacks if w.segmentation]
                job.sr = build_measurement_report(results, self.bundle, self.settings)
        op_output.emit(job, "study")
