"""Selector: choose the lumbar axial T2 series, split it into stacks and load the pixels."""

from __future__ import annotations

import logging

from monai.deploy.core import Fragment, Operator, OperatorSpec

from app.config import SelectionRules
from paraspinal.series_selection import select_series
from paraspinal.stacks import load_stack
from paraspinal.study_job import JobStatus, StackWork, StudyJob


class SeriesSelectorOperator(Operator):
    """Applies :class:`SelectionRules`; logs one line per series saying why it was (not) chosen.

    Input/Output:
        study: StudyJob (``selection`` and ``stacks`` filled; status ``no_suitable_series`` when none fits)
    """

    def __init__(self, fragment: Fragment, *args, rules: SelectionRules, **kwargs) -> None:
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.rules = rules
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        job: StudyJob = op_input.receive("study")
        with job.stage("select"):
            job.selection = select_series(job.study, self.rules)
            for decision in job.selection.decisions:
                self._logger.info("study %s %s: %s", job.study_uid,
                                  f"series {decision.series_number or '?'} '{decision.description}'", decision.reason)
            if job.selection.chosen is None:
                job.status, job.reason = JobStatus.NO_SUITABLE_SERIES, job.selection.reason
                self._logger.warning("study %s: %s", job.study_uid, job.reason)
        if job.active:
            with job.stage("load"):
                chosen = job.selection.chosen
                job.stacks = [StackWork(load_stack(plan, chosen.series_uid, i))
                              for i, plan in enumerate(chosen.stacks or [], start=1)]
        op_output.emit(job, "study")
