"""The Ray actor of a re-analysis: one per worker, holding a loaded model, one study at a time.

Ray places each actor on a node with a free CPU (or GPU, when the actor asks for one) and
restarts it when its process dies (``max_restarts``); the driver (:mod:`app.reanalyse.cli`)
then submits the study again. The actor itself keeps nothing between studies but the model:
each study is fetched into a scratch folder, analysed, its results stored, and the folder
deleted, so a worker's memory does not grow with the number of studies.

Fault injection (tests only): with ``crash_once=(study_uid, marker_file)`` the actor's
process ends with ``os._exit`` in the middle of that study (after fetching it, before the
analysis) the first time it sees it, creating ``marker_file`` so the retry goes through. It is
a real process death, which Ray must detect and recover from.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from app.config import Config, DicomwebDestination

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """Results could not be stored (STOW-RS refused or unreachable); the study is retried."""


class FetchError(RuntimeError):
    """The study could not be fetched by WADO-RS (absent, or the archive unreachable)."""


def _rss_mb() -> float:
    """Resident memory of this process now, MiB (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class StudyAnalyser:
    """Analyses studies one at a time with the model loaded once (wrap with ``ray.remote``).

    Args:
        model_path: the model bundle or a folder holding one.
        config: the pipeline configuration (selection, quantification, output, quality).
        device: torch device; None: ``cuda`` when Ray gave this actor a GPU, else ``cpu``.
        source: the DICOMweb archive studies are fetched from (None: studies are folders).
        output_dicomweb: where results are stored by STOW-RS, or None.
        output_folder: where result folders are published (``<folder>/<StudyInstanceUID>/``), or None.
        scratch_dir: parent of the per-study scratch folders (None: the system's temp folder).
        crash_once: fault injection for tests, see the module docstring.
    """

    def __init__(self, model_path: str, config: Config, device: str | None = None,
                 source: DicomwebDestination | None = None, output_dicomweb: DicomwebDestination | None = None,
                 output_folder: str | None = None, scratch_dir: str | None = None,
                 crash_once: tuple[str, str] | None = None) -> None:
        os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
        logging.getLogger("highdicom").setLevel(logging.WARNING)
        import pydicom.config

        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        if device is None:
            import ray

            device = "cuda" if ray.get_gpu_ids() else "cpu"
        import app.application  # noqa: F401  (Holoscan, MONAI Deploy, highdicom: paid once per actor)
        from paraspinal.model_bundle import load_bundle

        self.bundle = load_bundle(Path(model_path), device)  # cached per process: run_batch reuses it
        self.model_path, self.config, self.device = model_path, config, device
        self.source, self.output_dicomweb, self.output_folder = source, output_dicomweb, output_folder
        self.scratch_dir = scratch_dir
        self.crash_once = crash_once

    def identity(self) -> dict[str, Any]:
        """Where this actor runs: host, pid, device, model, resident memory (MiB)."""
        import torch

        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                "torch_threads": torch.get_num_threads(),
                "model": f"{self.bundle.name} {self.bundle.version}", "rss_mb": round(_rss_mb(), 1)}

    def _fetch(self, study_uid: str, folder: Path) -> int:
        """WADO-RS the whole study into ``folder``, one file per instance as it streams; returns the count."""
        import requests

        from app.dicomweb import make_client

        folder.mkdir(parents=True)
        n = 0
        try:
            for n, ds in enumerate(make_client(self.source).iter_study(study_uid), start=1):
                ds.save_as(folder / f"{n:06d}.dcm", enforce_file_format=True)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise FetchError(f"WADO-RS of the study: HTTP {code}") from None
        except requests.RequestException as exc:
            raise FetchError(f"WADO-RS of the study: {type(exc).__name__}: {str(exc)[:200]}") from None
        if n == 0:
            raise FetchError("WADO-RS returned no instance of the study")
        return n

    def _maybe_crash(self, study_uid: str) -> None:
        if self.crash_once and self.crash_once[0] == study_uid and not Path(self.crash_once[1]).exists():
            Path(self.crash_once[1]).write_text(f"pid {os.getpid()} ended itself in study {study_uid}\n")
            os._exit(137)

    def _store(self, results: Path) -> list[tuple[str, str]]:
        """STOW-RS the results folder's DICOM files; every one must be stored, else :class:`StoreError`."""
        from app.dicomweb import STORED_STATUSES, stow_files

        paths = sorted(results.glob("*.dcm"))
        outcomes = stow_files(paths, self.output_dicomweb)
        failed = [f"{p.name}: {note or f'status 0x{status:04X}'}" for p, status, note in outcomes
                  if status not in STORED_STATUSES]
        if failed:
            raise StoreError("STOW-RS of the results failed: " + "; ".join(failed)[:500])
        return _identities(paths)

    def analyse(self, study_uid: str, folder: str = "") -> dict[str, Any]:
        """Fetch (unless ``folder`` holds the study), analyse, store; returns the outcome.

        The outcome: ``status`` (done | no_suitable_series | failed, as ``result.json``),
        ``reason``, ``rows`` (the study's ``measurements.csv`` as dicts), ``outputs`` ([SOP Class
        UID, SOP Instance UID] stored), ``instances`` fetched, ``timings_s`` (the pipeline's
        stages, s, from ``result.json``), ``elapsed_s`` (wall, s) and where
        it ran with its memory (``rss_mb`` now, ``peak_rss_mb`` of the process so far, MiB).
        Raises (so the driver retries) when the study cannot be fetched or its results stored.
        """
        from app.application import run_batch

        start = time.monotonic()
        scratch = Path(tempfile.mkdtemp(prefix="reanalyse-", dir=self.scratch_dir))
        try:
            instances = 0
            if folder:
                source = Path(folder)
            else:
                source = scratch / "in"
                instances = self._fetch(study_uid, source)
            self._maybe_crash(study_uid)
            out_root = Path(self.output_folder) if self.output_folder else scratch / "out"
            outcomes = run_batch(source, out_root, Path(self.model_path), self.config, self.device)
            outcome = next((o for o in outcomes if o.get("study_instance_uid") == study_uid), None)
            if outcome is None:
                status, reason, results = "failed", "the pipeline found no readable instance of the study", None
            else:
                status, reason = str(outcome["status"]), str(outcome.get("reason", ""))
                results = Path(outcome["folder"]) if outcome.get("folder") else None
            rows: list[dict[str, str]] = []
            outputs: list[tuple[str, str]] = []
            timings: dict[str, float] = {}
            if results is not None and (results / "result.json").is_file():
                timings = json.loads((results / "result.json").read_text()).get("timings_s", {})
            if status == "done" and results is not None:
                with open(results / "measurements.csv", newline="") as handle:
                    rows = list(csv.DictReader(handle))
                outputs = self._store(results) if self.output_dicomweb else _identities(sorted(results.glob("*.dcm")))
            return {"study_uid": study_uid, "status": status, "reason": reason, "rows": rows,
                    "outputs": outputs, "instances": instances, "timings_s": timings,
                    "elapsed_s": round(time.monotonic() - start, 3),
                    "host": socket.gethostname(), "pid": os.getpid(), "rss_mb": round(_rss_mb(), 1),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            _release_free_memory()


def _release_free_memory() -> None:
    """Give freed heap back to the system (glibc ``malloc_trim``). In a Ray actor the pipeline's
    freed buffers otherwise stay in malloc arenas and the resident size grows study after study."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _identities(paths: list[Path]) -> list[tuple[str, str]]:
    import pydicom

    found = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        found.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return found
