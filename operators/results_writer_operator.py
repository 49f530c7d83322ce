"""Results writer: the study's folder with SEG, SR, measurements and result.json, written atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from paraspinal.model_bundle import ModelBundle
from paraspinal.report_pdf import PdfFile
from paraspinal.results_folder import write_results_folder
from paraspinal.study_job import JobStatus, StudyJob


class ResultsWriterOperator(Operator):
    """Publishes ``<output_folder>/<StudyInstanceUID>/`` for every study, whatever its status.

    A failed study still gets its folder with ``result.json`` naming the stage and reason, so
    nothing is lost silently. ``outcomes`` collects each study's result for the caller.

    Input:
        study: StudyJob
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, bundle: ModelBundle, **kwargs) -> None:
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.output_folder = Path(output_folder)
        self.bundle = bundle
        self.outcomes: list[dict] = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")

    def _result(self, job: StudyJob) -> dict:
        first = job.study.first
        selection = job.selection
        return {
            "study_instance_uid": job.study_uid,
            "accession_number": str(first.get("AccessionNumber", "")),
            "study_date": str(first.get("StudyDate", "")),
            "status": job.status.value,
            "reason": job.reason,
            "failed_stage": job.failed_stage,
            "chosen_series": selection.chosen.as_dict() if selection and selection.chosen else None,
            "series_decisions": [d.as_dict() for d in selection.decisions] if selection else [],
            "skipped_files": [{"path": str(p.path), "reason": p.reason} for p in job.input_problems],
            "model": {"name": self.bundle.name, "version": self.bundle.version,
                      "weights_sha256": self.bundle.weights_sha256, "device": str(self.bundle.device)},
            "timings_s": job.timings_s,
        }

    def _measurements(self, job: StudyJob) -> dict:
        return {
            "study_instance_uid": job.study_uid,
            "units": {"csa": "mm2", "volume": "cm3", "fat_fraction": "%", "slice_z": "mm (LPS z, head +)"},
            "model": {"name": self.bundle.name, "version": self.bundle.version,
                      # per label: Dice on held-out real data (model card); a label absent was never evaluated
                      "held_out_dice": {str(k): round(v, 3) for k, v in self.bundle.held_out_dice().items()}},
            "stacks": [
                {
                    "series_instance_uid": w.volume.series_uid,
                    "stack": w.volume.index,
                    "n_slices": w.volume.n_slices,
                    "pixel_spacing_mm": list(w.volume.pixel_spacing_mm),
                    "slice_step_mm": round(w.volume.slice_step_mm, 3),
                    "seg_sop_instance_uid": str(w.segmentation.dataset.SOPInstanceUID) if w.segmentation else None,
                    "measurements": [m.as_dict() for m in w.measurements],
                }
                for w in job.stacks
            ],
        }

    def compute(self, op_input, op_output, context) -> None:
        job: StudyJob = op_input.receive("study")
        objects, measurements = {}, None
        if job.status is JobStatus.PENDING:
            for work in job.stacks:
                if work.segmentation is not None:
                    objects[f"seg_stack{work.volume.index}.dcm"] = work.segmentation.dataset
            if job.sr is not None:
                objects["sr.dcm"] = job.sr
            if getattr(job, "viewer_sr", None) is not None:
                objects["sr_viewer.dcm"] = job.viewer_sr
            report = getattr(job, "report", None)  # set by ReportOperator
            if report is not None:
                objects["report_pdf.dcm"] = report.dataset  # Encapsulated PDF, sent with SEG and SR
                objects["report.pdf"] = PdfFile(report.pdf)
            measurements = self._measurements(job)
            job.status = JobStatus.DONE
            job.reason = f"{sum(name.endswith('.dcm') for name in objects)} DICOM object(s) written"
        try:
            folder = write_results_folder(self.output_folder, job.study_uid, self._result(job), objects, measurements)
        except Exception as exc:  # e.g. disk full: say so, keep serving other studies
            self._logger.error("study %s: results could not be written: %s", job.study_uid, exc)
            job.fail("write_results", f"{type(exc).__name__}: {exc}")
            self.outcomes.append({"study_instance_uid": job.study_uid, "status": job.status.value,
                                  "reason": job.reason, "folder": None})
            return
        level = logging.INFO if job.status is JobStatus.DONE else logging.WARNING
        self._logger.log(level, "study %s: %s (%s) -> %s", job.study_uid, job.status.value, job.reason, folder)
        self.outcomes.append({"study_instance_uid": job.study_uid, "status": job.status.value,
                              "reason": job.reason, "folder": str(folder)})
