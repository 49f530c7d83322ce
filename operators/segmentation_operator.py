"""Segment: run the model on every stack and map labels back to the source grid."""

from __future__ import annotations

import numpy as np
from monai.deploy.core import Fragment

from operators.study_stage import StudyStageOperator
from paraspinal.model_bundle import ModelBundle
from paraspinal.segmentation import segment_stack_with_uncertainty
from paraspinal.study_job import StudyJob


class SegmentationOperator(StudyStageOperator):
    """2D sliding-window inference (CUDA when present, else CPU) with the bundle's network,
    loaded once per process by :func:`paraspinal.model_bundle.load_bundle`.

    Input/Output:
        study: StudyJob (each stack's ``labels`` filled, (slice, row, col) uint8, and its per-slice
            ``uncertainty`` for the quality control)
    """

    stage = "inference"

    def __init__(self, fragment: Fragment, *args, bundle: ModelBundle, **kwargs) -> None:
        self.bundle = bundle
        super().__init__(fragment, *args, **kwargs)

    def process(self, job: StudyJob) -> None:
        for work in job.stacks:
            work.labels, work.uncertainty = segment_stack_with_uncertainty(work.volume, self.bundle, work.model_input)
            work.model_input = None  # release model-space copies early
            found = [int(v) for v in np.unique(work.labels) if v]
            self._logger.info("study %s stack %d: %d slices on %s, labels %s", job.study_uid,
                              work.volume.index, work.volume.n_slices, self.bundle.device, found)
