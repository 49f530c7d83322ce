"""Loader: index the input folder and emit one study at a time."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from paraspinal.dicom_index import index_folder
from paraspinal.study_job import StudyJob

STOP_CONDITION = "more_studies"


class StudyLoaderOperator(Operator):
    """Reads headers of every file under ``input_folder`` and emits a :class:`StudyJob` per study.

    Must be created with a ``BooleanCondition`` named ``"more_studies"``; it disables that
    condition after the last study so the application ends. Files that are not usable DICOM
    are logged and attached to every job's ``input_problems`` (they cannot be assigned to a study).

    Output:
        study: StudyJob
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, **kwargs) -> None:
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.input_folder = Path(input_folder)
        self._pending: list[StudyJob] | None = None
        self.studies_found = 0
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        if self._pending is None:
            index = index_folder(self.input_folder)
            self._pending = [StudyJob(study=s, input_problems=index.problems) for s in index.studies.values()]
            self.studies_found = len(self._pending)
            self._logger.info("input %s: %d study(ies), %d file(s) skipped",
                              self.input_folder, len(self._pending), len(index.problems))
        if self._pending:
            job = self._pending.pop(0)
            self._logger.info("study %s: %d series, %d instances", job.study_uid,
                              len(job.study.series), job.study.n_instances)
            op_output.emit(job, "study")
        if not self._pending:
            self.conditions[STOP_CONDITION].disable_tick()
