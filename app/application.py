"""The MONAI Deploy application: the operator graph, one study at a time through it.

    loader -> selector -> preprocess -> segmentation -> quantification -> SEG writer -> SR writer -> report
    -> results

Each arrow carries a :class:`paraspinal.study_job.StudyJob`; see ``operators/`` for each stage.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from holoscan.conditions import BooleanCondition
from monai.deploy.core import Application

from app.config import Config, load_config
from operators.preprocess_operator import PreprocessOperator
from operators.quantification_operator import QuantificationOperator
from operators.report_operator import ReportOperator
from operators.results_writer_operator import ResultsWriterOperator
from operators.segmentation_operator import SegmentationOperator
from operators.seg_writer_operator import SegWriterOperator
from operators.series_selector_operator import SeriesSelectorOperator
from operators.sr_writer_operator import SRWriterOperator
from operators.study_loader_operator import STOP_CONDITION, StudyLoaderOperator
from paraspinal.model_bundle import load_bundle

log = logging.getLogger(__name__)


class ParaspinalMuscleApp(Application):
    """Lumbar axial T2 in, DICOM SEG + TID 1500 SR + measurements out, per study.

    Args:
        input_folder: folder of DICOM files (any number of studies, any layout).
        output_folder: one sub-folder per study is written here (see ``results_folder``).
        model_path: the model bundle, or a folder holding exactly one bundle.
        config: the loaded configuration (selection rules, quantification, output settings).
    """

    def __init__(self, input_folder: Path, output_folder: Path, model_path: Path, config: Config | None = None,
                 device: str | None = None) -> None:
        super().__init__([sys.executable])
        self.input_folder = Path(input_folder)
        self.output_folder = Path(output_folder)
        self.model_path = Path(model_path)
        self.config = config or load_config()
        self.device = device
        self.results: ResultsWriterOperator | None = None

    def compose(self) -> None:
        cfg = self.config
        bundle = load_bundle(self.model_path, self.device)
        loader = StudyLoaderOperator(self, BooleanCondition(self, name=STOP_CONDITION),
                                     input_folder=self.input_folder, name="loader")
        selector = SeriesSelectorOperator(self, rules=cfg.selection, name="selector")
        preprocess = PreprocessOperator(self, bundle=bundle, name="preprocess")
        segment = SegmentationOperator(self, bundle=bundle, name="segmentation")
        quantify = QuantificationOperator(self, bundle=bundle, settings=cfg.quantification, quality=cfg.quality,
                                          name="quantification")
        seg_writer = SegWriterOperator(self, bundle=bundle, settings=cfg.output, name="seg_writer")
        sr_writer = SRWriterOperator(self, bundle=bundle, settings=cfg.output, name="sr_writer")
        report = ReportOperator(self, bundle=bundle, settings=cfg.output, quantification=cfg.quantification,
                                name="report")
        self.results = ResultsWriterOperator(self, output_folder=self.output_folder, bundle=bundle, name="results")
        chain = [loader, selector, preprocess, segment, quantify, seg_writer, sr_writer, report, self.results]
        for upstream, downstream in zip(chain, chain[1:]):
            self.add_flow(upstream, downstream, {("study", "study")})


def run_batch(input_folder: Path, output_folder: Path, model_path: Path, config: Config | None = None,
              device: str | None = None) -> list[dict]:
    """Run the application over a folder; returns one outcome dict per study found."""
    app = ParaspinalMuscleApp(input_folder, output_folder, model_path, config, device)
    app.run()
    return list(app.results.outcomes) if app.results else []
