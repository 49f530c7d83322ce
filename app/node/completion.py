"""Study completion: DICOM has no end-of-study signal, so a study is complete after a
sliding quiet period (``quiet_period_s``) with no new instance.

Every counted arrival moves the study's ``last_received`` forward (see
:meth:`app.node.state.StateStore.record_instance`), so the period slides; the same rule
covers a study that was analysed already: new data send it back to ``receiving`` and it is
analysed again once quiet.
"""

from __future__ import annotations

import logging

from app.node.logs import log_event
from app.node.state import StateStore

log = logging.getLogger(__name__)


class CompletionTracker:
    """Moves quiet studies from ``receiving`` to ``queued``.

    Args:
        state: the state store.
        quiet_period_s: seconds without a counted arrival after which a study is complete.
    """

    def __init__(self, state: StateStore, quiet_period_s: float) -> None:
        self.state = state
        self.quiet_period_s = float(quiet_period_s)

    def promote_ready(self, now: float | None = None) -> list[str]:
        """Queue every study that has been quiet long enough; returns their UIDs."""
        ready = self.state.mark_ready(self.quiet_period_s, now)
        for study_uid in ready:
            log_event(log, logging.INFO, "study_complete", study=study_uid, quiet_period_s=self.quiet_period_s)
        return ready

    def seconds_until_next(self, now: float | None = None) -> float | None:
        """Seconds until the next receiving study completes; None when none is receiving."""
        return self.state.next_ready_in_s(self.quiet_period_s, now)
