"""The node as one service: listener, completion, workers and sender wired together.

Threads in the node process:

* pynetdicom's server threads (one per association) run the listener's handlers;
* the scheduler thread promotes quiet studies and feeds the worker pool
  (:class:`app.node.worker.Dispatcher`), and writes a heartbeat to the state database;
* the sender thread sends due outbox items;
* the corrections thread turns received muscle SEGs into site cases (app.node.corrections);
  the scheduler also starts, pauses and resumes the node's own fine-tune (app.node.learning,
  off by default).

On start, state left by an earlier run is resumed: analyses that were running are queued
again, studies found in the spool but missing from the database are adopted, studies still
receiving get a fresh quiet period (their senders could not reach the node while it was
down), leftovers of killed writes (hidden temp files, ``.incomplete-*`` folders) are removed,
and pending outbox items are sent.

On stop (SIGTERM): the listener stops accepting and open associations get up to
``shutdown_grace_s`` to finish; no new analysis starts, running ones get the rest of that
time (their outputs are queued and the sender keeps sending meanwhile); whatever is still
running then stays ``processing`` in the database and is resumed at the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from app.config import Config
from app.node.audit import AuditLog
from app.node.completion import CompletionTracker
from app.node.corrections import CorrectionIntake
from app.node.learning import FinetuneRunner
from app.node.listener import Listener
from app.node.logs import log_event
from app.node.retention import purge_expired, purge_refused_corrections
from app.node.sender import Sender
from app.node.spool import Spool, ensure_dir
from app.node.state import StateStore
from app.node.worker import Dispatcher
from paraspinal.model_registry import ModelRegistry

log = logging.getLogger(__name__)

#: Longest the scheduler sleeps between looks at the database, s (also the heartbeat period).
SCHEDULER_TICK_S = 0.25
SENDER_TICK_S = 1.0
HEARTBEAT_EVERY_S = 5.0


def audit_path(settings) -> Path:
    """``audit_log``, or ``audit.jsonl`` beside the state database when it is not set."""
    return Path(settings.audit_log) if settings.audit_log else Path(settings.state_db).parent / "audit.jsonl"


class NodeService:
    """The running node.

    Args:
        config: the loaded configuration (its ``node`` section drives the service).
        model_path: the model bundle, or a folder holding exactly one.
        device: torch device for the workers (None: CUDA when available, else CPU).
        log_level: log level for the worker processes.
    """

    def __init__(self, config: Config, model_path: Path, device: str | None = None, log_level: str = "INFO") -> None:
        self.config = config
        self.settings = config.node
        self.model_path = Path(model_path)
        self.device = device
        self.log_level = log_level
        self.state: StateStore | None = None
        self.listener: Listener | None = None
        self.dispatcher: Dispatcher | None = None
        self.audit: AuditLog | None = None
        self._stop_requested = threading.Event()
        self._stop = threading.Event()
        self._wake_scheduler = threading.Event()
        self._wake_sender = threading.Event()
        self._threads: list[threading.Thread] = []
        self.spool: Spool | None = None
        self.registry: ModelRegistry | None = None
        self.intake: CorrectionIntake | None = None
        self.finetune: FinetuneRunner | None = None

    def start(self) -> None:
        """Open the state, resume earlier work, start workers, listener and loops."""
        s = self.settings
        for folder in (s.results_dir, s.failed_dir):
            ensure_dir(Path(folder))
        self.audit = AuditLog(audit_path(s))
        self.state = StateStore(s.state_db)
        spool = self.spool = Spool(s.spool_dir)
        temp_files = spool.remove_stale_temp_files()
        partial_dirs = self._remove_partial_folders()
        requeued = self.state.requeue_interrupted()
        adopted = self.state.adopt_spool_studies(spool.study_uids())
        restarted = self.state.restart_quiet_periods()
        log_event(log, logging.INFO, "node_resumed", requeued=len(requeued), adopted=len(adopted),
                  receiving=len(restarted), stale_temp_files=temp_files, partial_folders=partial_dirs,
                  state_db=s.state_db)
        self.registry = ModelRegistry(self.model_path, self.config.learning.models_dir)
        self.dispatcher = Dispatcher(s, self.config, self.state, spool, self.model_path, self.device, self.log_level,
                                     registry=self.registry)
        self.dispatcher.start()
        self.intake = None
        if self.config.learning.corrections:
            self.intake = CorrectionIntake(self.config.learning, self.state, spool, self.audit, self.registry)
            self.intake.start()
        self.listener = Listener(s, spool, self.state, self.audit,
                                 seg_sink=self.intake.submit if self.intake is not None else None)
        self.listener.start()
        self.finetune = FinetuneRunner(self.config, self.model_path, self.audit)
        completion = CompletionTracker(self.state, s.quiet_period_s)
        sender = Sender(s, self.state, self.audit)
        self._threads = [
            threading.Thread(target=self._scheduler_loop, args=(completion,), name="node-scheduler", daemon=True),
            threading.Thread(target=self._sender_loop, args=(sender,), name="node-sender", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.state.set_info(pid=os.getpid(), started_at=time.time(), heartbeat_at=time.time(), ae_title=s.ae_title,
                            address=s.bind_address, port=self.listener.port, quiet_period_s=s.quiet_period_s,
                            workers=s.workers, model_path=self.model_path, stopped_at="",
                            tls="on" if s.tls_enabled else "off")
        self.audit.write("node_started", ae_title=s.ae_title, address=s.bind_address, port=self.listener.port,
                         pid=os.getpid(), tls=s.tls_enabled, allowed_peers=[f"{p.ae_title}@{p.host or '*'}"
                                                                             for p in s.allowed_peers])
        log_event(log, logging.INFO, "node_started", ae_title=s.ae_title, port=self.listener.port,
                  quiet_period_s=s.quiet_period_s, workers=s.workers,
                  destinations=",".join(d.outbox_key for d in s.destinations) or "none")

    def _remove_partial_folders(self) -> int:
        """Results and failed-study folders still named ``.incomplete-*`` were being written
        when the node was killed; they are never published, so they can go."""
        removed = 0
        for root in (Path(self.settings.results_dir), Path(self.settings.failed_dir)):
            for entry in root.glob(".incomplete-*") if root.is_dir() else []:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    def stop(self) -> None:
        """Stop gracefully within ``shutdown_grace_s`` (see the module doc), then close."""
        grace = max(0.0, float(self.settings.shutdown_grace_s))
        deadline = time.monotonic() + grace
        self._stop_requested.set()
        if self.dispatcher is not None:
            self.dispatcher.stop_accepting()
        if self.listener is not None:
            self.listener.stop(grace)
        # Running analyses may finish meanwhile: the scheduler collects them, the sender sends.
        while self.dispatcher is not None and self.dispatcher.busy and time.monotonic() < deadline:
            time.sleep(0.1)
        self._stop.set()
        self._wake_scheduler.set()
        self._wake_sender.set()
        for thread in self._threads:
            thread.join(timeout=30.0)
        if self.finetune is not None:
            self.finetune.stop()
        if self.dispatcher is not None:
            self.dispatcher.shutdown(max(0.0, deadline - time.monotonic()))
        if getattr(self, "intake", None) is not None:
            self.intake.stop()
        if self.state is not None:
            self.state.set_info(stopped_at=time.time())
            self.state.close()
            self.state = None
        if self.audit is not None:
            self.audit.write("node_stopped", pid=os.getpid())
            self.audit.close()
        log_event(log, logging.INFO, "node_stopped")

    def wait(self) -> None:
        """Block until :meth:`request_stop` is called (e.g. from a signal handler)."""
        while not self._stop_requested.wait(timeout=1.0):
            pass

    def request_stop(self) -> None:
        """Begin stopping (safe in a signal handler): no new analysis from now on."""
        if self.dispatcher is not None:
            self.dispatcher.stop_accepting()
        self._stop_requested.set()

    # ---- loops -----------------------------------------------------------------------------

    def _scheduler_loop(self, completion: CompletionTracker) -> None:
        assert self.state is not None and self.dispatcher is not None and self.spool is not None
        last_beat = 0.0
        next_retention = 0.0  # at start, then every retention_check_interval_s
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + self.settings.retention_check_interval_s
                    purge_expired(self.settings, self.state, self.spool, self.audit)
                    purge_refused_corrections(self.config.learning.refused_dir, self.settings.retention_days,
                                              self.audit)
                completion.promote_ready()
                if self.dispatcher.poll():
                    self._wake_sender.set()  # finished jobs may have queued outputs
                if self.finetune is not None and (self.finetune.enabled or self.finetune.process is not None):
                    self.finetune.poll(self.dispatcher.busy > 0 or self.state.studies_waiting() > 0)
                now = time.time()
                if now - last_beat >= HEARTBEAT_EVERY_S:
                    self.state.set_info(heartbeat_at=now)
                    last_beat = now
            except Exception:  # the loop must survive anything one study can cause
                log.exception("scheduler error")
            self._wake_scheduler.wait(timeout=SCHEDULER_TICK_S)
            self._wake_scheduler.clear()

    def _sender_loop(self, sender: Sender) -> None:
        assert self.state is not None
        while not self._stop.is_set():
            try:
                sender.send_due()
                due_in = self.state.next_due_in_s()
            except Exception:
                log.exception("sender error")
                due_in = None
            timeout = SENDER_TICK_S if due_in is None else min(SENDER_TICK_S, max(0.05, due_in))
            self._wake_sender.wait(timeout=timeout)
            self._wake_sender.clear()
