"""SR writer: one TID 1500 Measurement Report (Comprehensive 3D SR) per study."""

from __future__ import annotations

from monai.deploy.core import Fragment

from operators.study_stage import StudyStageOperator
from paraspinal.dicom_outputs import build_measurement_report, build_viewer_report
from paraspinal.model_bundle import ModelBundle
from paraspinal.settings import OutputSettings
from paraspinal.study_job import StudyJob


class SRWriterOperator(StudyStageOperator):
    """Builds the measurement report: a volumetric group per found muscle per stack, each
    referencing its SEG segment, with volume (cm3), mean/max CSA (cm2) and fat fraction (%).

    Also the viewer SR: the same report's outline groups alone (what OHIF can show).

    Input/Output:
        study: StudyJob (``sr`` and ``viewer_sr`` filled)
    """

    stage = "sr_encode"

    def __init__(self, fragment: Fragment, *args, bundle: ModelBundle, settings: OutputSettings, **kwargs) -> None:
        self.bundle = bundle
        self.settings = settings
        super().__init__(fragment, *args, **kwargs)

    def process(self, job: StudyJob) -> None:
        results = [(w.volume, w.segmentation, w.measurements) for w in job.stacks if w.segmentation]
        job.sr = build_measurement_report(results, self.bundle, self.settings)
        job.viewer_sr = build_viewer_report(results, self.bundle, self.settings)
