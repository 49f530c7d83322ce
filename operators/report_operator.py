"""Report: the PDF for people and the same PDF as a DICOM Encapsulated PDF in the study."""

from __future__ import annotations

from dataclasses import dataclass

from monai.deploy.core import Fragment
from pydicom.dataset import Dataset

from operators.study_stage import StudyStageOperator
from paraspinal.dicom_outputs import SOFTWARE_VERSION, content_key, stable_uid
from paraspinal.model_bundle import ModelBundle
from paraspinal.report_pdf import ReportContext, ReportStack, encapsulated_pdf, render_report_pdf
from paraspinal.settings import OutputSettings, QuantificationSettings
from paraspinal.study_job import StudyJob


@dataclass
class StudyReport:
    """The rendered report: PDF bytes and the Encapsulated PDF instance."""

    pdf: bytes
    dataset: Dataset


class ReportOperator(StudyStageOperator):
    """Renders the report (:mod:`paraspinal.report_pdf`) of every study that has measurements and
    wraps it as an Encapsulated PDF (new series in the same study, ``output.report_series_number``,
    UIDs derived from the source series and the model like the SEG and SR).

    A report that cannot be rendered does not fail the study: SEG and SR are still delivered and
    the log says why the report is missing.

    Input/Output:
        study: StudyJob (``report`` set to a :class:`StudyReport`, or ``None``)
    """

    stage = "report"

    def __init__(self, fragment: Fragment, *args, bundle: ModelBundle, settings: OutputSettings,
                 quantification: QuantificationSettings, **kwargs) -> None:
        self.bundle = bundle
        self.settings = settings
        self.quantification = quantification
        super().__init__(fragment, *args, **kwargs)

    def process(self, job: StudyJob) -> None:
        works = [w for w in job.stacks if w.labels is not None and any(m.found for m in w.measurements)]
        if not works:
            return
        try:
            job.report = self.build(job, works)
        except Exception as exc:  # the report must not cost the study its SEG and SR
            self._logger.error("study %s: report not written: %s: %s", job.study_uid, type(exc).__name__, exc)

    def build(self, job: StudyJob, works) -> StudyReport:
        source = works[0].volume.datasets[0]
        bias = next((m.bias_correction for w in works for m in w.measurements if m.found), "none")
        ctx = ReportContext(model_name=self.bundle.name, model_version=self.bundle.version,
                            weights_sha256=self.bundle.weights_sha256, fat_method=self.quantification.fat_method,
                            bias_correction=bias, software_version=SOFTWARE_VERSION,
                            held_out_dice=self.bundle.held_out_dice())
        stacks = [ReportStack(w.volume, w.labels, w.measurements) for w in works]
        pdf = render_report_pdf(source, stacks, self.bundle.labels, ctx)
        key = (works[0].volume.series_uid, self.bundle.weights_sha256,
               content_key(m for w in works for m in w.measurements))
        referenced = [w.segmentation.dataset for w in works if w.segmentation is not None]
        if job.sr is not None:
            referenced.append(job.sr)
        dataset = encapsulated_pdf(
            pdf, source, series_instance_uid=stable_uid(*key, "pdf-series"),
            sop_instance_uid=stable_uid(*key, "pdf-instance"),
            series_number=self.settings.report_series_number,
            manufacturer=self.settings.manufacturer, model_name=self.settings.manufacturer_model_name,
            software_version=f"{SOFTWARE_VERSION} model {self.bundle.name} {self.bundle.version}",
            referenced=referenced)
        return StudyReport(pdf=pdf, dataset=dataset)
