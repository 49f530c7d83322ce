"""Analysis workers: a fixed number of processes, each running the MONAI Deploy pipeline.

Why processes: the pipeline (Holoscan, torch) wants the main thread of its process, a
32 MB stack and its own memory; a crash or a leak in it must not take the listener down.
Each worker process loads the model bundle once, when it starts (``load_bundle`` is cached
per process), and then runs :func:`app.application.run_batch` for one study at a time on
that study's spool folder, writing ``results_dir/<StudyInstanceUID>/`` atomically.

The :class:`Dispatcher` (called from the node's scheduler thread) owns the worker processes,
one pipe each, so it always knows which process analyses which study. It claims queued
studies while a worker is free, collects finished jobs, keeps failed studies under
``failed_dir`` with their reason, and queues the outputs of successful ones in the outbox,
in the same database transaction that marks the study done. It also enforces:

* ``analysis_timeout_s``: an analysis running longer is stopped by killing its worker
  process (only that one), the study is failed with that reason, and a new worker starts;
* a worker process that dies (segfault, out of memory, killed) fails only its own study
  (a study that crashes the pipeline must not crash it again and again) and is replaced;
* shutdown (:meth:`Dispatcher.shutdown`): no new jobs, running ones get ``grace_s`` to
  finish (their outputs are queued), the rest stay ``processing`` in the database and are
  analysed again after the restart; a worker that dies while the node is stopping (a SIGTERM
  to the whole process group reaches the workers too) leaves its study in progress, not
  failed. Worker processes ignore SIGINT and die with the node (PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import pydicom

from app.config import Config, NodeSettings
from app.node.logs import log_event, setup_logging
from app.node.spool import Spool, atomic_write, ensure_dir, publish_dir
from app.node.state import Claim, StateStore
from paraspinal.model_registry import ModelRegistry

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


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when the node process ends, however it ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def init_worker(model_path: str, device: str | None, log_level: str, hash_uids: bool = False) -> str | None:
    """Process set-up: signals, logging as key=value lines, then load the pipeline and the model once.

    Returns None when the worker can analyse, else why it cannot (the pipeline does not import,
    the model does not load): the worker then fails each study with that reason, and the
    node's health check reports it."""
    _die_with_parent()
    # A terminal's Ctrl-C reaches the whole process group: the node stops gracefully on it, and
    # its workers should not be cut short behind its back. (A worker that dies while the node
    # is stopping does not fail its study either; see Dispatcher._replace.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Holoscan's C++ logger (spdlog) writes straight to stderr: keep its warnings and errors
    # only, in the same key=value shape as the node's own lines.
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    os.environ.setdefault("HOLOSCAN_LOG_FORMAT", HOLOSCAN_LOG_FORMAT)
    setup_logging(log_level, hash_uids=hash_uids)
    # highdicom narrates every module it copies at INFO; its warnings still show.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    import pydicom.config

    # Value validation warnings quote the value (possibly patient data) on stderr.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        import app.application  # noqa: F401  (Holoscan, MONAI Deploy, highdicom: import cost paid at start)
        from paraspinal.model_bundle import load_bundle

        bundle = load_bundle(Path(model_path), device)
    except Exception as exc:  # studies will fail with this reason; the node keeps running, unhealthy
        error = f"{type(exc).__name__}: {exc}"
        log_event(log, logging.ERROR, "worker_load_error", pid=os.getpid(), error=error)
        return error
    log_event(log, logging.INFO, "worker_ready", pid=os.getpid(), model=bundle.name, version=bundle.version,
              device=str(bundle.device), weights_sha256=bundle.weights_sha256[:12])
    return None


def analyse_study(study_uid: str, study_dir: str, results_dir: str, model_path: str, config: Config,
                  device: str | None) -> JobResult:
    """Run the pipeline on one study's spool folder (in a worker process)."""
    start = time.monotonic()
    try:
        from app.application import run_batch

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


def worker_main(conn: Connection, model_path: str, device: str | None, log_level: str, hash_uids: bool) -> None:
    """A worker process: set up, say ``ready`` (or ``unready`` and why), then run jobs from the
    pipe until told to stop.

    Messages to the node: ``("ready", pid)`` or ``("unready", reason)``, ``("started", study_uid)``,
    ``("done", JobResult)``. Jobs from the node: ``(study_uid, study_dir, results_dir, model_path,
    config, device)``; None ends.
    """
    error = init_worker(model_path, device, log_level, hash_uids)
    conn.send(("ready", os.getpid()) if error is None else ("unready", error))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the node is gone
            return
        if job is None:
            return
        conn.send(("started", job[0]))
        start = time.monotonic()
        try:
            result = analyse_study(*job)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # e.g. a codec's Rust panic (pyo3 PanicException is no Exception)
            conn.send(("done", JobResult(
                job[0], "failed", f"{type(exc).__name__}: {exc} (raised past the pipeline's error handling; "
                                  f"the worker process is replaced)", None, round(time.monotonic() - start, 3),
                os.getpid())))
            return  # whatever state that left behind goes with this process
        conn.send(("done", result))


# ---- in the node process -----------------------------------------------------------------


def collect_outputs(results_path: Path) -> list[tuple[Path, str, str]]:
    """(path, SOP Class UID, SOP Instance UID) of every ``.dcm`` in a results folder, by name."""
    objects = []
    for path in sorted(Path(results_path).glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        objects.append((path, str(header.SOPClassUID), str(header.SOPInstanceUID)))
    return objects


class WorkerProcess:
    """One worker process and the node's end of its pipe."""

    def __init__(self, ctx, index: int, model_path: Path, device: str | None, log_level: str, hash_uids: bool) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=worker_main, name=f"analysis-worker-{index}", daemon=True,
                                   args=(child, str(model_path), device, log_level, hash_uids))
        self.process.start()
        child.close()
        self.ready = False
        self.load_error: str | None = None  # why this worker cannot analyse (it said "unready")
        self.claim: Claim | None = None
        self.started_at: float | None = None  # monotonic, when the worker began the current job
        self.result: JobResult | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def drain(self) -> bool:
        """Read every message waiting in the pipe; False when the pipe is closed (process gone)."""
        try:
            while self.conn.poll():
                kind, payload = self.conn.recv()
                if kind == "ready":
                    self.ready = True
                elif kind == "unready":
                    self.load_error = str(payload)
                elif kind == "started":
                    self.started_at = time.monotonic()
                elif kind == "done":
                    self.result = payload
        except (EOFError, OSError):
            return False
        return True

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        self.conn.close()


class Dispatcher:
    """Runs queued studies on ``settings.workers`` worker processes.

    Args:
        settings: the node section (workers, results_dir, failed_dir, destinations,
            analysis_timeout_s, log_uids).
        config: the whole configuration, passed to the pipeline.
        state: the state store.
        spool: the spool the studies are read from.
        model_path: the model bundle (or a folder holding one).
        device: torch device for the workers (None: CUDA when available, else CPU).
        log_level: the workers' log level.
    """

    def __init__(self, settings: NodeSettings, config: Config, state: StateStore, spool: Spool, model_path: Path,
                 device: str | None = None, log_level: str = "INFO", registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.config = config
        self.state = state
        self.spool = spool
        self.model_path = Path(model_path)
        self.device = device
        self.log_level = log_level
        self.n_workers = max(1, int(settings.workers))
        self._ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of the listener's threads
        self._workers: list[WorkerProcess | None] = []
        self._respawn_at: list[float] = []      # monotonic time an empty slot gets a new worker
        self._respawn_delay: list[float] = []   # grows while workers die before they are ready
        self._started = 0
        self._accepting = False
        self._load_error = ""  # the latest reason a worker could not load the pipeline and model
        self._published: tuple[int, str] | None = None  # (workers_ready, worker_error) last written
        self.destinations = [d.outbox_key for d in settings.destinations]
        #: the model versions: each study is analysed with the version active when it is claimed,
        #: so a promotion or rollback takes effect between studies without a restart.
        self.registry = registry
        self._model_in_use = self.model_path

    def _spawn(self) -> WorkerProcess:
        self._started += 1
        return WorkerProcess(self._ctx, self._started, self.model_path, self.device, self.log_level,
                             self.settings.log_uids == "hashed")

    def start(self) -> None:
        """Start the worker processes; each loads the model now rather than at the first study."""
        self._workers = [self._spawn() for _ in range(self.n_workers)]
        self._respawn_at = [0.0] * self.n_workers
        self._respawn_delay = [0.0] * self.n_workers
        self._accepting = True
        self._publish_readiness()
        log_event(log, logging.INFO, "workers_starting", workers=self.n_workers, model_path=self.model_path,
                  analysis_timeout_s=self.settings.analysis_timeout_s)

    def stop_accepting(self) -> None:
        """Start no new analysis (shutdown has begun); running ones go on."""
        self._accepting = False

    @property
    def busy(self) -> int:
        return sum(1 for w in self._workers if w is not None and w.claim is not None)

    def poll(self) -> int:
        """Collect finished jobs, enforce the time limit, replace dead workers, then start
        queued studies while a worker is free. Returns the number of jobs that ended."""
        ended = 0
        for index, worker in enumerate(list(self._workers)):
            if worker is None:
                if self._accepting and time.monotonic() >= self._respawn_at[index]:
                    self._workers[index] = self._spawn()
                continue
            was_ready = worker.ready
            open_pipe = worker.drain()
            if worker.ready and not was_ready:
                self._respawn_delay[index] = 0.0
                self.state.set_info(worker_ready_at=time.time())
            if worker.load_error:
                self._load_error = worker.load_error
            if worker.result is not None and worker.claim is not None:
                claim, result = worker.claim, worker.result
                worker.claim, worker.result, worker.started_at = None, None, None
                self._complete(claim, result)
                ended += 1
            if not open_pipe or not worker.process.is_alive():
                ended += self._replace(index, worker, "died")
            elif (worker.claim is not None and worker.started_at is not None
                  and time.monotonic() - worker.started_at > self.settings.analysis_timeout_s):
                ended += self._replace(index, worker, "timeout")
        while self._accepting:
            worker = next((w for w in self._workers if w is not None and w.claim is None
                           and w.process.is_alive()), None)
            if worker is None:
                break
            claim = self.state.claim_next()
            if claim is None:
                break
            study_dir = self.spool.study_dir(claim.study_uid)
            model_path = self._current_model()
            try:
                worker.conn.send((claim.study_uid, str(study_dir), str(self.settings.results_dir),
                                  str(model_path), self.config, self.device))
            except (OSError, ValueError):  # the process is gone: the study waits for the next worker
                self.state.release(claim)
                break
            worker.claim, worker.started_at = claim, None
            log_event(log, logging.INFO, "analysis_started", study=claim.study_uid, attempt=claim.attempt,
                      busy=self.busy, workers=self.n_workers, worker_pid=worker.pid)
        self._publish_readiness()
        return ended

    def _current_model(self) -> Path:
        """The active model version's bundle (a stat of the pointer per study), logged when it changes."""
        if self.registry is None:
            return self.model_path
        path = self.registry.active_path()
        if path != self._model_in_use:
            log_event(log, logging.INFO, "model_switched", previous=self._model_in_use, model_path=path,
                      note="studies claimed from now on use this model version")
            self._model_in_use = path
        return path

    @property
    def ready(self) -> int:
        """Worker processes alive with the pipeline and the model loaded."""
        return sum(1 for w in self._workers if w is not None and w.ready and w.process.is_alive())

    def _publish_readiness(self) -> None:
        """Write ``workers_ready`` and ``worker_error`` to the node info when they change: the
        health check reports a node none of whose workers can analyse as unhealthy."""
        current = (self.ready, "" if self.ready else self._load_error)
        if current != self._published:
            self.state.set_info(workers_ready=current[0], worker_error=current[1])
            self._published = current

    def _replace(self, index: int, worker: WorkerProcess, why: str) -> int:
        """End ``worker`` (dead or over time), fail its study with the reason, start another."""
        exitcode = worker.process.exitcode
        worker.kill()
        if why == "died" and not worker.ready and not worker.load_error:
            self._load_error = f"a worker process ended (exit code {exitcode}) before it loaded the pipeline and model"
        if why == "died":
            log_event(log, logging.ERROR if worker.claim else logging.WARNING, "worker_pool_broken", pid=worker.pid,
                      exitcode=exitcode, study=worker.claim.study_uid if worker.claim else "-",
                      note="a worker process ended; it is replaced and the model loaded again")
        ended = 0
        if worker.claim is not None and why == "died" and not self._accepting:
            # The node is stopping: a worker that ends now (a SIGTERM to the whole process group
            # reaches it too) was stopped, not crashed. The study stays in progress and is
            # analysed again after the restart.
            log_event(log, logging.WARNING, "analysis_interrupted", study=worker.claim.study_uid, pid=worker.pid,
                      exitcode=exitcode, note="the node is stopping; analysed again after the restart")
            worker.claim = None
        if worker.claim is not None:
            if why == "timeout":
                reason = (f"analysis time limit exceeded: still running after {self.settings.analysis_timeout_s:g} s "
                          f"(analysis_timeout_s); the worker process was stopped")
                log_event(log, logging.ERROR, "analysis_timeout", study=worker.claim.study_uid, pid=worker.pid,
                          limit_s=self.settings.analysis_timeout_s)
            else:
                reason = f"worker process failed: it died (exit code {exitcode}) during the analysis"
            elapsed = round(time.monotonic() - worker.started_at, 3) if worker.started_at else 0.0
            self._complete(worker.claim, JobResult(worker.claim.study_uid, "failed", reason, None, elapsed,
                                                   worker.pid or 0))
            ended = 1
        # A worker that dies before it is ready (model or import failure) would die again at
        # once: wait 1, 2, 4 ... 60 s before the next one; a worker that did work is replaced now.
        delay = 0.0 if worker.ready else min(60.0, max(1.0, 2 * self._respawn_delay[index]))
        self._respawn_delay[index] = delay
        self._respawn_at[index] = time.monotonic() + delay
        self._workers[index] = None
        if delay == 0.0 and self._accepting:
            self._workers[index] = self._spawn()
        return ended

    def _complete(self, claim: Claim, result: JobResult) -> None:
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

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop the workers: no new jobs; running analyses get up to ``grace_s`` to finish
        (their outputs are queued as usual); whatever still runs then is abandoned, its study
        stays ``processing`` in the database and is queued again when the node restarts."""
        self._accepting = False
        deadline = time.monotonic() + max(0.0, grace_s)
        abandoned: list[str] = []
        while time.monotonic() < deadline:
            running = [w for w in self._workers if w is not None and w.claim is not None]
            if not running:
                break
            for worker in running:
                worker.drain()
                if worker.result is not None:
                    claim, result = worker.claim, worker.result
                    worker.claim, worker.result = None, None
                    self._complete(claim, result)
                elif not worker.process.is_alive():  # resumed after the restart, not failed
                    abandoned.append(worker.claim.study_uid)
                    worker.claim = None
            time.sleep(0.1)
        interrupted = abandoned + [w.claim.study_uid for w in self._workers if w is not None and w.claim is not None]
        self._workers = [w for w in self._workers if w is not None]
        for worker in self._workers:
            if worker.claim is None:
                try:
                    worker.conn.send(None)  # idle: leave on its own
                except (OSError, ValueError):
                    pass
        for worker in self._workers:
            if worker.claim is None:
                worker.process.join(0.5)  # idle: nothing to lose, so no long wait
            worker.kill()
        self._workers = []
        if interrupted:
            log_event(log, logging.INFO, "analyses_interrupted", studies=",".join(interrupted),
                      note="left in progress; analysed again after the restart")
