"""Analysis workers: a bounded pool of processes, each running the MONAI Deploy pipeline.

Why processes: the pipeline (Holoscan, torch) wants the main thread of its process, a
32 MB stack and its own memory; a crash or a leak in it must not take the listener down.
Each worker process loads the model bundle once, when it starts (``load_bundle`` is cached
per process), and then runs :func:`app.application.run_batch` for one study at a time on
that study's spool folder, writing ``results_dir/<StudyInstanceUID>/`` atomically.

The :class:`Dispatcher` (called from the node's scheduler thread) claims queued studies up to
``workers`` at a time, collects finished jobs, keeps failed studies under ``failed_dir`` with
their reason, and queues the outputs of successful ones in the outbox, in the same database
transaction that marks the study done.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom

from app.config import Config, NodeSettings
from app.node.logs import log_event, setup_logging
from app.node.spool import Spool, atomic_write, ensure_dir, publish_dir
from app.node.state import Claim, StateStore, destination_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    """What one analysis produced (picklable: it crosses the process boundary).

    Attributes:
        study_uid: the study.
        status: ``done`` | ``no_suitable_series`` | ``failed`` (``result.json``'s status).
        reason: why, in words.
        results_path: the study's results folder, when one was written.
        elapsed_s: wall time of the analysis, s.
        worker_pid: the process that ran it.
    """

    study_uid: str
    status: str
    reason: str
    results_path: str | None
    elapsed_s: float
    worker_pid: int


#: spdlog pattern giving Holoscan's lines the node's key=value shape (ISO time with offset).
HOLOSCAN_LOG_FORMAT = 'ts=%Y-%m-%dT%H:%M:%S.%e%z level=%l logger=holoscan src=%s:%# msg="%v"'


# ---- inside a worker process -------------------------------------------------------------


def init_worker(model_path: str, device: str | None, log_level: str) -> None:
    """Process initializer: logging as key=value lines, then load the model once."""
    # Holoscan's C++ logger (spdlog) writes straight to stderr: keep its warnings and errors
    # only, in the same key=value shape as the node's own lines.
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    os.environ.setdefault("HOLOSCAN_LOG_FORMAT", HOLOSCAN_LOG_FORMAT)
    setup_logging(log_level)
    # highdicom narrates every module it copies at INFO; its warnings still show.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    import app.application  # noqa: F401  (Holoscan, MONAI Deploy, highdicom: import cost paid at start)
    from paraspinal.model_bundle import load_bundle

    try:
        bundle = load_bundle(Path(model_path), device)
    except Exception as exc:  # studies will fail with this reason; the node keeps running
        log_event(log, logging.ERROR, "worker_model_error", pid=os.getpid(), error=f"{type(exc).__name__}: {exc}")
        return
    log_event(log, logging.INFO, "worker_ready", pid=os.getpid(), model=bundle.name, version=bundle.version,
              device=str(bundle.device), weights_sha256=bundle.weights_sha256[:12])


def worker_ping() -> int:
    """A no-op job: submitting one per worker starts the processes (and loads the model) early."""
    return os.getpid()


def analyse_study(study_uid: str, study_dir: str, results_dir: str, model_path: str, config: Config,
                  device: str | None) -> JobResult:
    """Run the pipeline on one study's spool folder (in a worker process)."""
    from app.application import run_batch

    start = time.monotonic()
    try:
        outcomes = run_batch(Path(study_dir), Path(results_dir), Path(model_path), config, device)
    except Exception as exc:  # e.g. the bundle cannot be loaded: the study fails, the worker lives
        return JobResult(study_uid, "failed", f"{type(exc).__name__}: {exc}", None,
                         round(time.monotonic() - start, 3), os.getpid())
    elapsed = round(time.monotonic() - start, 3)
    for outcome in outcomes:
        if outcome.get("study_instance_uid") == study_uid:
            return JobResult(study_uid, str(outcome["status"]), str(outcome.get("reason", "")),
                             outcome.get("folder"), elapsed, os.getpid())
    return JobResult(study_uid, "failed", f"the pipeline found no readable instance of the study in {study_dir}",
                     None, elapsed, os.getpid())


# ---- in the node process -----------------------------------------------------------------


def collect_outputs(results_path: Path) -> list[tuple[Path, str, str]]:
    """(path, SOP Class UID, SOP Instance UID) of every ``.dcm`` in a results folder, by name."""
    objects = []
    for path in sorted(Path(results_path).glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        objects.append((path, str(header.SOPClassUID), str(header.SOPInstanceUID)))
    return objects


class Dispatcher:
    """Runs queued studies on at most ``settings.workers`` worker processes.

    Args:
        settings: the node section (workers, results_dir, failed_dir, destinations).
        config: the whole configuration, passed to the pipeline.
        state: the state store.
        spool: the spool the studies are read from.
        model_path: the model bundle (or a folder holding one).
        device: torch device for the workers (None: CUDA when available, else CPU).
        log_level: the workers' log level.
    """

    def __init__(self, settings: NodeSettings, config: Config, state: StateStore, spool: Spool, model_path: Path,
                 device: str | None = None, log_level: str = "INFO") -> None:
        self.settings = settings
        self.config = config
        self.state = state
        self.spool = spool
        self.model_path = Path(model_path)
        self.device = device
        self.log_level = log_level
        self.workers = max(1, int(settings.workers))
        self._pool: ProcessPoolExecutor | None = None
        self._running: dict[Future, Claim] = {}
        self._warmups: list[Future] = []
        self.destinations = [destination_key(d.ae_title, d.host, d.port) for d in settings.destinations]

    def start(self) -> None:
        """Start the worker processes; each loads the model now rather than at the first study."""
        # "spawn": a fresh interpreter, no copy of the listener's threads and sockets.
        self._pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker, initargs=(str(self.model_path), self.device, self.log_level))
        self._warmups = [self._pool.submit(worker_ping) for _ in range(self.workers)]
        log_event(log, logging.INFO, "workers_starting", workers=self.workers, model_path=self.model_path)

    @property
    def busy(self) -> int:
        return len(self._running)

    def poll(self) -> int:
        """Collect finished jobs, then start queued studies while a worker is free.

        Returns the number of jobs that finished.
        """
        self._check_warmups()
        finished = [f for f in self._running if f.done()]
        for future in finished:
            self._complete(self._running.pop(future), future)
        if self._pool is not None and getattr(self._pool, "_broken", False):
            self._restart_pool("a worker process died")
        while self._pool is not None and len(self._running) < self.workers:
            claim = self.state.claim_next()
            if claim is None:
                break
            study_dir = self.spool.study_dir(claim.study_uid)
            log_event(log, logging.INFO, "analysis_started", study=claim.study_uid, attempt=claim.attempt,
                      busy=len(self._running) + 1, workers=self.workers)
            try:
                future = self._pool.submit(analyse_study, claim.study_uid, str(study_dir),
                                           str(self.settings.results_dir), str(self.model_path), self.config,
                                           self.device)
            except BrokenProcessPool as exc:  # the study fails with the reason; the pool restarts next poll
                future = Future()
                future.set_exception(exc)
            self._running[future] = claim
        return len(finished)

    def _check_warmups(self) -> None:
        for future in [f for f in self._warmups if f.done()]:
            self._warmups.remove(future)
            if future.exception() is None:
                self.state.set_info(worker_ready_at=time.time())

    def _complete(self, claim: Claim, future: Future) -> None:
        try:
            result: JobResult = future.result()
        except Exception as exc:  # the worker process died (segfault, out of memory, killed)
            result = JobResult(claim.study_uid, "failed", f"worker process failed: {type(exc).__name__}: {exc}",
                               None, 0.0, 0)
        ok = result.status != "failed"
        failed_path = None if ok else self._keep_failed(claim, result)
        objects: list[tuple[Path, str, str]] = []
        if ok and result.results_path:
            try:
                objects = collect_outputs(Path(result.results_path))
            except Exception as exc:  # a results folder we cannot read is a failed study
                ok = False
                result = JobResult(result.study_uid, "failed", f"results unreadable: {type(exc).__name__}: {exc}",
                                   result.results_path, result.elapsed_s, result.worker_pid)
                failed_path = self._keep_failed(claim, result)
        current = self.state.finish(claim, ok, result.status, result.reason, result.results_path, failed_path,
                                    outputs=objects if ok else [], destinations=self.destinations)
        fields = dict(study=claim.study_uid, outcome=result.status, elapsed_s=result.elapsed_s,
                      worker_pid=result.worker_pid, objects=len(objects), reason=result.reason)
        if not current:
            log_event(log, logging.INFO, "analysis_superseded", **fields,
                      note="instances arrived during the analysis; a new analysis follows the quiet period")
        elif ok:
            log_event(log, logging.INFO, "analysis_done", **fields,
                      queued=len(objects) * len(self.destinations))
        else:
            log_event(log, logging.ERROR, "analysis_failed", **fields, kept=failed_path)

    def _keep_failed(self, claim: Claim, result: JobResult) -> str | None:
        """Copy the study's spool folder, its result.json and a reason file to
        ``failed_dir/<study>/`` (replacing an earlier failure of the same study)."""
        failed_root = Path(self.settings.failed_dir)
        final = failed_root / claim.study_uid
        staging = failed_root / f".incomplete-{claim.study_uid}-{os.getpid()}"
        try:
            ensure_dir(failed_root)
            shutil.rmtree(staging, ignore_errors=True)
            source = self.spool.study_dir(claim.study_uid)
            if source.is_dir():
                # Hidden temp files of transfers in flight are not part of the study.
                shutil.copytree(source, staging / "instances", ignore=shutil.ignore_patterns(".*"))
            else:
                staging.mkdir(parents=True)
            if result.results_path and (Path(result.results_path) / "result.json").is_file():
                shutil.copy2(Path(result.results_path) / "result.json", staging / "result.json")
            reason = {"study_instance_uid": claim.study_uid, "attempt": claim.attempt, "failed_at": time.time(),
                      **asdict(result)}
            atomic_write(staging / "reason.json", json.dumps(reason, indent=2).encode())
            atomic_write(staging / "reason.txt", f"{result.reason}\n".encode())
            publish_dir(staging, final)
            return str(final)
        except OSError as exc:  # keeping the evidence failed; the failure itself is still recorded
            log_event(log, logging.ERROR, "failed_copy_error", study=claim.study_uid, error=str(exc))
            return None

    def _restart_pool(self, why: str) -> None:
        log_event(log, logging.ERROR, "worker_pool_broken", error=why, note="restarting the worker processes")
        old, self._pool = self._pool, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        self.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the workers. A running analysis is abandoned: its study stays ``processing``
        in the database and is queued again when the node restarts."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values())  # to end a long analysis now
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        if self._running:
            log_event(log, logging.INFO, "analyses_interrupted", studies=",".join(c.study_uid for c in
                                                                                 self._running.values()))
        self._running.clear()
