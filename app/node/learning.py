"""The node fine-tunes by itself: after ``learning.finetune_after`` new corrections, when idle.

:class:`FinetuneRunner` is polled by the scheduler thread. It starts
``python -m training.finetune`` (which trains, runs the gate and promotes only a candidate that
passes) as a child process

* only when no study is receiving, queued or being analysed,
* at the lowest CPU priority (nice 19) with one torch/OpenMP thread,
* and stops it (SIGSTOP) as soon as a study waits, continuing it (SIGCONT) when the node is
  idle again: training never takes CPU from an analysis.

A fine-tune that fails is not retried until more corrections arrive. ``finetune_after: 0``
(the default) never starts one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.config import PROJECT_ROOT, Config
from app.node.audit import AuditLog
from app.node.logs import log_event
from paraspinal.site_dataset import list_cases

log = logging.getLogger(__name__)

#: How often the site folder is counted while nothing runs, s.
CHECK_EVERY_S = 10.0


def _lower_priority() -> None:
    os.nice(19)


class FinetuneRunner:
    """Starts, pauses, resumes and reaps the node's own fine-tune.

    Args:
        config: the node's configuration (``learning`` section; its site file is passed on).
        shipped: the shipped bundle the node was started with.
        audit: the audit trail (``finetune_started`` / ``finetune_finished``).
    """

    def __init__(self, config: Config, shipped: Path, audit: AuditLog) -> None:
        self.config = config
        self.learning = config.learning
        self.shipped = Path(shipped)
        self.audit = audit
        self.process: subprocess.Popen | None = None
        self.paused = False
        self._next_check = 0.0
        self._tried_at_cases = -1  # cases counted when the last run started (no retry without new ones)
        self._log_handle = None

    @property
    def enabled(self) -> bool:
        return self.learning.finetune_after > 0

    def _cases_at_last_run(self) -> int:
        state = Path(self.learning.site_dir) / "finetune_state.json"
        try:
            return int(json.loads(state.read_text()).get("cases_at_last_finetune", 0))
        except (OSError, ValueError):
            return 0

    def poll(self, studies_waiting: bool) -> None:
        """One scheduler tick: pause or resume a running fine-tune, reap it, or start one."""
        if self.process is not None:
            if self.process.poll() is not None:
                self._reap()
            elif studies_waiting and not self.paused:
                os.killpg(self.process.pid, signal.SIGSTOP)
                self.paused = True
                log_event(log, logging.INFO, "finetune_paused", pid=self.process.pid, note="studies wait")
            elif not studies_waiting and self.paused:
                os.killpg(self.process.pid, signal.SIGCONT)
                self.paused = False
                log_event(log, logging.INFO, "finetune_resumed", pid=self.process.pid)
            return
        if not self.enabled or studies_waiting or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + CHECK_EVERY_S
        cases = len(list_cases(self.learning.site_dir))
        new = cases - self._cases_at_last_run()
        if new < self.learning.finetune_after or cases == self._tried_at_cases:
            return
        self._start(cases, new)

    def _start(self, cases: int, new: int) -> None:
        work = Path(self.learning.models_dir) / ".work"
        work.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(work / "finetune.log", "ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        site_files = [s for s in self.config.source[1:] if not s.startswith("PARASPINAL__")]
        if site_files:
            env["PARASPINAL_CONFIG"] = site_files[0]
        command = [sys.executable, "-m", "training.finetune", "--site", str(self.learning.site_dir),
                   "-m", str(self.shipped), "--threads", "1"]
        self.process = subprocess.Popen(command, stdout=self._log_handle, stderr=subprocess.STDOUT, env=env,
                                        cwd=str(Path.cwd()), preexec_fn=_lower_priority, start_new_session=True)
        self.paused = False
        self._tried_at_cases = cases
        log_event(log, logging.INFO, "finetune_started", pid=self.process.pid, site_cases=cases, new_cases=new,
                  log=work / "finetune.log")
        self.audit.write("finetune_started", site_cases=cases, new_cases=new, pid=self.process.pid)

    def _reap(self) -> None:
        assert self.process is not None
        code = self.process.returncode
        level = logging.INFO if code == 0 else logging.ERROR
        log_event(log, level, "finetune_finished", pid=self.process.pid, exit_code=code)
        self.audit.write("finetune_finished", pid=self.process.pid, exit_code=code)
        self.process = None
        self.paused = False
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def stop(self) -> None:
        """End a running fine-tune (the node is stopping); its partial run is discarded."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10.0)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10.0)
        self._reap()
