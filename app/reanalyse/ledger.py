"""The run's record: one JSON file per study under ``<workdir>/studies/``.

A study's file is written (atomically) by the driver only once its outcome is final: results
stored (STOW-RS answered, or the results folder published) and measurements in hand, or the
study failed for good. ``--resume`` skips every study with a file: its results exist
(``done``), it had nothing to analyse (``no_suitable_series``), or it failed for good after its
retries (``failed``: listed in the failure summary; ``--retry-failed`` analyses those again).
Since the pipeline's output UIDs are derived from the inputs
(:func:`paraspinal.dicom_outputs.stable_uid`), analysing a study twice stores the same SOP
instances again: resuming after a crash of the driver is idempotent.

Files are spread over 256 sub-folders by a hash of the UID, so no folder gets huge at 100,000
studies; nothing is held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

#: Outcomes after which a study is not analysed again by ``--resume``.
FINAL_OK = ("done", "no_suitable_series")


class StudyLedger:
    """Per-study outcome files of one run folder.

    Args:
        workdir: the run's folder (``<workdir>/studies/`` is created).
    """

    def __init__(self, workdir: Path) -> None:
        self.root = Path(workdir) / "studies"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, study_uid: str) -> Path:
        shard = hashlib.sha256(study_uid.encode()).hexdigest()[:2]
        return self.root / shard / f"{study_uid}.json"

    def read(self, study_uid: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(study_uid).read_text())
        except (OSError, ValueError):
            return None

    def finished(self, study_uid: str, retry_failed: bool = False) -> bool:
        """The study has a final outcome (with ``retry_failed``: other than ``failed``)."""
        record = self.read(study_uid)
        return record is not None and (record.get("status") in FINAL_OK or not retry_failed)

    def write(self, record: dict[str, Any]) -> Path:
        """Record one study's final outcome (``record["study_uid"]`` names it)."""
        path = self.path(str(record["study_uid"]))
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(record, default=str))
        os.replace(partial, path)
        return path

    def records(self) -> Iterator[dict[str, Any]]:
        """Every recorded study, in a stable order (shard, then UID), one file at a time."""
        for shard in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for path in sorted(shard.glob("*.json")):
                try:
                    yield json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
