"""Index a folder of DICOM files by study and series, reading headers only.

Every file that cannot be used is recorded with the reason (not DICOM, truncated,
no study UID, unusable functional groups), never silently skipped: the loader logs them and the
study result lists them.

A multi-frame Enhanced MR or Legacy Converted Enhanced MR instance becomes one record per frame
(a "frame source": the instance's file and SOP Instance UID plus the frame number, with a
classic-like header flattened from the functional groups, see :mod:`paraspinal.enhanced_mr`),
so selection, stacking and Dixon pairing treat frames as classic images.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from paraspinal.enhanced_mr import FunctionalGroupError, frame_headers, is_multi_frame_mr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileProblem:
    """A file in the input that could not be indexed, and why."""

    path: Path
    reason: str


@dataclass
class InstanceRecord:
    """One image: a classic instance, or one frame of a multi-frame instance (``frame_number``
    1-based; ``header`` then holds that frame's flattened attributes, see :mod:`paraspinal.enhanced_mr`)."""

    path: Path
    header: Dataset  # read with stop_before_pixels
    frame_number: int | None = None
    problem: str | None = None  # why this instance cannot be used as an image (multi-frame only)

    @property
    def name(self) -> str:
        """How log lines and reasons name the image: the file name, and the frame where multi-frame."""
        return self.path.name if self.frame_number is None else f"{self.path.name} frame {self.frame_number}"

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.get("SOPInstanceUID", ""))

    @property
    def sop_class_uid(self) -> str:
        return str(self.header.get("SOPClassUID", ""))


@dataclass
class SeriesRecord:
    series_uid: str
    instances: list[InstanceRecord] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        return self.instances[0].header

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", ""))

    @property
    def series_number(self) -> str:
        return str(self.first.get("SeriesNumber", ""))

    def label(self) -> str:
        """Human-readable name for log lines: number, description and UID."""
        return f"series {self.series_number or '?'} '{self.description}' ({self.series_uid})"


@dataclass
class StudyRecord:
    study_uid: str
    series: dict[str, SeriesRecord] = field(default_factory=dict)

    @property
    def first(self) -> Dataset:
        return next(iter(self.series.values())).first

    @property
    def n_instances(self) -> int:
        return sum(len(s.instances) for s in self.series.values())


@dataclass
class FolderIndex:
    studies: dict[str, StudyRecord]
    problems: list[FileProblem]


def _read_header(path: Path) -> Dataset:
    """The header, every top-level element decoded now.

    pydicom decodes an element's value only when it is first used; an element it cannot
    decode (say, an unknown VR) would raise (NotImplementedError, ValueError, ...) wherever
    the value is first read: in selection, or while grouping by UID here. Decoding them all
    at once makes such a file one input problem, like any other unreadable file."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    for _ in header:  # iterating converts each raw element to a DataElement
        pass
    return header


def index_folder(root: Path) -> FolderIndex:
    """Read the header of every file below ``root`` and group instances by study and series.

    Duplicate SOP Instance UIDs (the same instance stored twice) are kept once.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input path {root} does not exist")
    paths = [root] if root.is_file() else sorted(
        Path(dirpath) / name for dirpath, _, names in os.walk(root) for name in names
    )
    studies: dict[str, StudyRecord] = {}
    problems: list[FileProblem] = []
    seen: set[str] = set()
    for path in paths:
        if path.name.startswith("."):
            continue  # hidden files: partial transfers, OS metadata
        try:
            header = _read_header(path)
        except InvalidDicomError:
            problems.append(FileProblem(path, "not a DICOM file (no DICM preamble or readable meta header)"))
            continue
        except Exception as exc:  # truncated or corrupt files raise many different errors
            problems.append(FileProblem(path, f"unreadable DICOM file: {type(exc).__name__}: {exc}"))
            continue
        study_uid = str(header.get("StudyInstanceUID", "")).strip()  # decoded by _read_header
        series_uid = str(header.get("SeriesInstanceUID", "")).strip()
        sop_uid = str(header.get("SOPInstanceUID", "")).strip()
        if not study_uid or not series_uid or not sop_uid:
            problems.append(FileProblem(path, "DICOM file lacks Study, Series or SOP Instance UID"))
            continue
        if sop_uid in seen:
            log.info("duplicate instance %s at %s ignored", sop_uid, path)
            continue
        records = [InstanceRecord(path, header)]
        if is_multi_frame_mr(header):
            try:
                records = [InstanceRecord(path, frame, number) for number, frame in enumerate(frame_headers(header), 1)]
            except FunctionalGroupError as exc:
                # Kept as one record: its series is rejected with this reason (series_selection).
                records = [InstanceRecord(path, header, problem=f"unusable Enhanced MR functional groups: {exc}")]
        seen.add(sop_uid)
        study = studies.setdefault(study_uid, StudyRecord(study_uid))
        series = study.series.get(series_uid)
        if series is None:
            series = study.series[series_uid] = SeriesRecord(series_uid)
        series.instances.extend(records)
    for problem in problems:
        log.warning("input file skipped: %s: %s", problem.path, problem.reason)
    return FolderIndex(studies=studies, problems=problems)
