"""Quantify: cross-sectional area, volume and fat per muscle and side, with Dixon PDFF where present."""

from __future__ import annotations

from monai.deploy.core import Fragment

from operators.study_stage import StudyStageOperator
from paraspinal.dixon import DixonPair, find_dixon_pair, pdff_on_stack
from paraspinal.levels import POSITION_NOTE, SliceLevels, StudyLevelSources, determine_levels
from paraspinal.model_bundle import ModelBundle
from paraspinal.quality import QualitySettings
from paraspinal.quantification import measure_stack
from paraspinal.settings import QuantificationSettings
from paraspinal.study_job import JobStatus, StackWork, StudyJob


class QuantificationOperator(StudyStageOperator):
    """Measures each stack with the configured fat method and bias correction (see
    :mod:`paraspinal.quantification`), and, when ``dixon_pdff`` is ``auto`` and the study holds a
    Dixon water/fat pair on the stack's frame of reference (:mod:`paraspinal.dixon`), the PDFF
    inside the same masks eroded in-plane by ``pdff_erosion_voxels``. A Dixon pair that cannot be read costs only the PDFF, not the study.
    Each slice's lumbar level comes from a SEG in the study labelling vertebrae/discs on the stack's
    frame of reference (:mod:`paraspinal.levels`); without one, or when it cannot be used, slices
    are reported by position, and an error there costs only the levels, not the study.

    Each muscle also gets its quality control (:mod:`paraspinal.quality`): the outline uncertainty
    from the segmentation and plausibility checks, combined into a "review recommended" flag.

    A study in which no muscle is found at all ends as ``no_suitable_series``: the images were
    accepted by the rules but show no lumbar paraspinal muscle (wrong anatomy or failed model).

    Input/Output:
        study: StudyJob (each stack's ``measurements`` filled)
    """

    stage = "quantification"

    def __init__(self, fragment: Fragment, *args, bundle: ModelBundle, settings: QuantificationSettings,
                 quality: QualitySettings | None = None, **kwargs) -> None:
        self.bundle = bundle
        self.settings = settings
        self.quality = quality or QualitySettings()
        super().__init__(fragment, *args, **kwargs)

    def _pdff(self, job: StudyJob, work: StackWork, pairs: dict[str, tuple[DixonPair | None, str]]):
        frame = str(work.volume.datasets[0].get("FrameOfReferenceUID", ""))
        if frame not in pairs:
            chosen = {job.selection.chosen.series_uid} if job.selection and job.selection.chosen else set()
            pairs[frame] = find_dixon_pair(job.study, frame, chosen)
        pair, why_not = pairs[frame]
        if pair is None:
            self._logger.info("study %s stack %d: no Dixon PDFF (%s)", job.study_uid, work.volume.index, why_not)
            return None, None
        try:
            pdff = pdff_on_stack(pair, work.volume)
        except Exception as exc:  # unreadable Dixon images: report without PDFF, say why
            self._logger.warning("study %s stack %d: Dixon PDFF not measured: %s: %s", job.study_uid,
                                 work.volume.index, type(exc).__name__, exc)
            return None, None
        self._logger.info("study %s stack %d: Dixon PDFF from %s", job.study_uid, work.volume.index, pair.reason)
        return pdff, pair.as_dict()

    def _levels(self, job: StudyJob, work: StackWork, sources: StudyLevelSources) -> SliceLevels:
        try:
            levels = sources.levels_for(work.volume, work.labels)
        except Exception as exc:  # a broken labelled source costs only the levels
            self._logger.warning("study %s stack %d: levels not determined: %s: %s", job.study_uid,
                                 work.volume.index, type(exc).__name__, exc)
            return determine_levels(work.volume.n_slices, f"level unknown: the labelled source could not be used "
                                    f"({type(exc).__name__}); {POSITION_NOTE}")
        known = sum(1 for level in levels.levels if level)
        self._logger.info("study %s stack %d: %d of %d slices with a lumbar level (%s)", job.study_uid,
                          work.volume.index, known, work.volume.n_slices, levels.method[:200])
        return levels

    def process(self, job: StudyJob) -> None:
        pairs: dict[str, tuple[DixonPair | None, str]] = {}
        level_sources = StudyLevelSources(job.study)  # headers only; a SEG's voxels are read when used
        for work in job.stacks:
            pdff, source = (self._pdff(job, work, pairs) if self.settings.dixon_pdff == "auto" else (None, None))
            work.measurements = measure_stack(work.volume, work.labels, self.bundle.labels,
                                              self.settings.fat_method, self.settings.min_muscle_voxels,
                                              bias_correction=self.settings.bias_correction, pdff=pdff,
                                              pdff_source=source, levels=self._levels(job, work, level_sources),
                                              uncertainty=work.uncertainty, quality=self.quality,
                                              pdff_erosion_voxels=self.settings.pdff_erosion_voxels)
        if not any(m.found for w in job.stacks for m in w.measurements):
            job.status = JobStatus.NO_SUITABLE_SERIES
            job.reason = "no paraspinal muscle found in the chosen series (not lumbar anatomy?)"
