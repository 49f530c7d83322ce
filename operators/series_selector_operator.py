"""Selector: choose the lumbar axial T2 series, split it into stacks and load the pixels."""

from __future__ import annotations

from monai.deploy.core import Fragment

from operators.study_stage import StudyStageOperator
from paraspinal.series_selection import select_series
from paraspinal.settings import SelectionRules
from paraspinal.stacks import load_stack
from paraspinal.study_job import JobStatus, StackWork, StudyJob


class SeriesSelectorOperator(StudyStageOperator):
    """Applies :class:`SelectionRules`; logs one line per series saying why it was (not) chosen,
    then decodes the chosen series' stacks (stage ``load``).

    Input/Output:
        study: StudyJob (``selection`` and ``stacks`` filled; status ``no_suitable_series`` when none fits)
    """

    stage = "select"

    def __init__(self, fragment: Fragment, *args, rules: SelectionRules, **kwargs) -> None:
        self.rules = rules
        super().__init__(fragment, *args, **kwargs)

    def process(self, job: StudyJob) -> None:
        job.selection = select_series(job.study, self.rules)
        for decision in job.selection.decisions:
            self._logger.info("study %s series %s '%s': %s", job.study_uid, decision.series_number or "?",
                              decision.description, decision.reason)
        if job.selection.chosen is None:
            job.status, job.reason = JobStatus.NO_SUITABLE_SERIES, job.selection.reason
            self._logger.warning("study %s: %s", job.study_uid, job.reason)
            return
        with job.stage("load"):
            chosen = job.selection.chosen
            job.stacks = [StackWork(load_stack(plan, chosen.series_uid, i))
                          for i, plan in enumerate(chosen.stacks or [], start=1)]
