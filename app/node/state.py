"""The node's memory: studies, jobs and the outbox in one SQLite file (WAL).

Study life cycle (``studies.status``)::

    receiving --quiet period--> queued --worker claims--> processing --> done | failed
        ^                                                      |
        +---- an instance arrives during or after analysis ----+

``received_seq`` counts the instance arrivals that call for an analysis. A job remembers the
value it started with; when it ends and the counter has moved, the study goes back to
``receiving`` instead of ``done`` (its data changed while it was analysed), so the newest
data always gets a fresh analysis after another quiet period.

Outbox item life cycle (``outbox.status``)::

    pending --C-STORE success--> sent
    pending --failure--> pending (attempts+1, next_attempt_at = now + backoff) ... --> dead
    pending | dead --the study was analysed again--> superseded

Times are Unix seconds (wall clock) because they must survive a restart. SQLite runs in
WAL mode with ``synchronous=FULL``: readers (``python -m app status``) never block the node,
and a committed transition survives a power cut. One connection is shared by the node's
threads behind a lock; every public method is one short transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from app.node.logs import uid_hash

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid       TEXT PRIMARY KEY,
    status          TEXT NOT NULL,              -- receiving | queued | processing | done | failed
    first_received  REAL NOT NULL,              -- Unix time, s
    last_received   REAL NOT NULL,              -- Unix time of the last arrival that counted, s
    received_seq    INTEGER NOT NULL DEFAULT 0, -- arrivals that call for an analysis
    processed_seq   INTEGER,                    -- received_seq the last finished analysis saw
    attempts        INTEGER NOT NULL DEFAULT 0, -- analyses started
    calling_ae      TEXT,
    started_at      REAL,
    finished_at     REAL,
    outcome         TEXT,                       -- result.json status: done | no_suitable_series | failed
    reason          TEXT,
    results_path    TEXT,
    failed_path     TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    sop_class_uid    TEXT,
    transfer_syntax  TEXT,
    size             INTEGER,
    first_received   REAL,
    last_received    REAL,
    times_received   INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY,
    study_uid        TEXT NOT NULL,
    path             TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    destination      TEXT NOT NULL,             -- "AE@host:port"
    status           TEXT NOT NULL,             -- pending | sent | dead | superseded
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_status      TEXT,                      -- DIMSE status or the error of the last attempt
    created_at       REAL NOT NULL,
    sent_at          REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(status, next_attempt_at);
CREATE TABLE IF NOT EXISTS node_info (
    key   TEXT PRIMARY KEY,
    value TEXT
);
"""

STUDY_STATUSES = ("receiving", "queued", "processing", "done", "failed")
OUTBOX_STATUSES = ("pending", "sent", "dead", "superseded")


@dataclass(frozen=True)
class Claim:
    """A study a worker took: analyse the spool as it is now; ``seq`` tells later if it changed."""

    study_uid: str
    seq: int
    attempt: int


@dataclass(frozen=True)
class OutboxItem:
    id: int
    study_uid: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    destination: str
    attempts: int


@dataclass(frozen=True)
class InstanceArrival:
    """What the listener tells the state about one stored instance."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    outcome: str  # spool outcome: new | changed | duplicate
    calling_ae: str
    #: False for an object that cannot change the analysis (a SEG without vertebra/disc labels,
    #: e.g. the node's own result routed back by a PACS): stored and recorded, but it neither
    #: restarts the quiet period nor sends an analysed study back to be analysed again.
    triggers_analysis: bool = True


def destination_key(ae_title: str, host: str, port: int) -> str:
    """How a destination is named in the outbox: ``AE@host:port``."""
    return f"{ae_title}@{host}:{port}"


def parse_destination_key(key: str) -> tuple[str, str, int]:
    ae_title, _, address = key.partition("@")
    host, _, port = address.rpartition(":")
    return ae_title, host, int(port)


def backoff_delay_s(attempts: int, base_s: float, max_s: float) -> float:
    """Delay before the next try after ``attempts`` failed ones: base * 2**(attempts-1), capped, s."""
    return min(max_s, base_s * (2 ** max(0, attempts - 1)))


class StateStore:
    """All node state; safe to share between the node's threads.

    Args:
        path: the SQLite file (created with its folder when missing).
        readonly: open for reading only (``status`` command); no schema changes.
    """

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        if readonly:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0,
                                       check_same_thread=False, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=10000")
        # Writers take the write lock up front so two threads never deadlock upgrading.
        self._begin = "BEGIN" if readonly else "BEGIN IMMEDIATE"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> "_Transaction":
        return _Transaction(self._db, self._lock, self._begin)

    # ---- receiving -------------------------------------------------------------------------

    def record_instance(self, arrival: InstanceArrival, now: float | None = None) -> str:
        """Record a stored instance; returns the study's status afterwards.

        A new or changed instance always restarts the study's quiet period and, when the
        study was analysed already, calls for a new analysis. An identical duplicate does
        so only while the study is still being received or its last analysis failed (a
        re-send is then a retry); for a done study it changes nothing, so a PACS that
        re-sends a whole study after the results arrive cannot loop the node.
        """
        now = time.time() if now is None else now
        a = arrival
        with self._tx() as db:
            times_received = db.execute(
                "INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax,"
                " size, first_received, last_received) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT(sop_instance_uid) DO UPDATE SET study_uid=excluded.study_uid,"
                " series_uid=excluded.series_uid, sop_class_uid=excluded.sop_class_uid,"
                " transfer_syntax=excluded.transfer_syntax, size=excluded.size,"
                " last_received=excluded.last_received, times_received=times_received+1"
                " RETURNING times_received",
                (a.sop_instance_uid, a.study_uid, a.series_uid, a.sop_class_uid, a.transfer_syntax, a.size, now, now),
            ).fetchone()[0]
            row = db.execute("SELECT status FROM studies WHERE study_uid=?", (a.study_uid,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO studies (study_uid, status, first_received, last_received, received_seq, calling_ae)"
                    " VALUES (?, 'receiving', ?, ?, 1, ?)", (a.study_uid, now, now, a.calling_ae))
                return "receiving"
            status = row["status"]
            # The spool says "duplicate" for a file already in place; if this database never
            # recorded it (first time here), the node stopped between the file's rename and the
            # commit (the peer got no response and re-sends): for the study it is a new instance.
            duplicate = a.outcome == "duplicate" and times_received > 1
            counts = a.triggers_analysis and (not duplicate or status in ("receiving", "queued", "failed"))
            if not counts:
                return status
            # While a worker holds the study it stays "processing"; the job sees the moved
            # counter when it ends and sends the study back to "receiving".
            new_status = "processing" if status == "processing" else "receiving"
            db.execute(
                "UPDATE studies SET status=?, last_received=?, received_seq=received_seq+1, calling_ae=?"
                " WHERE study_uid=?", (new_status, now, a.calling_ae, a.study_uid))
            return new_status

    def adopt_spool_studies(self, study_uids: Iterable[str], now: float | None = None) -> list[str]:
        """Studies found in the spool but unknown here (the node stopped between the file's
        rename and the database commit) become ``receiving``; returns those added."""
        now = time.time() if now is None else now
        added = []
        with self._tx() as db:
            for uid in study_uids:
                cur = db.execute(
                    "INSERT OR IGNORE INTO studies (study_uid, status, first_received, last_received, received_seq)"
                    " VALUES (?, 'receiving', ?, ?, 1)", (uid, now, now))
                if cur.rowcount:
                    added.append(uid)
        return added

    # ---- completion and jobs ---------------------------------------------------------------

    def mark_ready(self, quiet_period_s: float, now: float | None = None) -> list[str]:
        """Studies quiet for ``quiet_period_s`` go from ``receiving`` to ``queued``; returns them."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "UPDATE studies SET status='queued' WHERE status='receiving' AND last_received <= ?"
                " RETURNING study_uid", (now - quiet_period_s,)).fetchall()
        return [r["study_uid"] for r in rows]

    def next_ready_in_s(self, quiet_period_s: float, now: float | None = None) -> float | None:
        """Seconds until the next receiving study becomes ready (None when none is receiving)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT MIN(last_received) AS t FROM studies WHERE status='receiving'").fetchone()
        if row["t"] is None:
            return None
        return max(0.0, row["t"] + quiet_period_s - now)

    def claim_next(self, now: float | None = None) -> Claim | None:
        """Take the longest-waiting queued study for analysis (``processing``)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT study_uid FROM studies WHERE status='queued' ORDER BY last_received LIMIT 1").fetchone()
            if row is None:
                return None
            got = db.execute(
                "UPDATE studies SET status='processing', attempts=attempts+1, started_at=?, finished_at=NULL"
                " WHERE study_uid=? AND status='queued' RETURNING received_seq, attempts",
                (now, row["study_uid"])).fetchone()
        return Claim(row["study_uid"], got["received_seq"], got["attempts"]) if got else None

    def finish(self, claim: Claim, ok: bool, outcome: str, reason: str, results_path: str | None = None,
               failed_path: str | None = None, outputs: list[tuple[Path, str, str]] | None = None,
               destinations: list[str] | None = None, now: float | None = None) -> bool:
        """End a job and, in the same transaction, queue its ``outputs`` for ``destinations``
        (see :meth:`enqueue_outputs`; a failed job supersedes undelivered items and queues
        nothing), so a crash can never leave a done study unsent.

        Returns False when the study changed during the analysis: it then goes back to
        ``receiving``, nothing is queued (those outputs are stale), and a new analysis follows.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT received_seq FROM studies WHERE study_uid=?", (claim.study_uid,)).fetchone()
            current = row is not None and row["received_seq"] == claim.seq
            db.execute(
                "UPDATE studies SET status=?, finished_at=?, outcome=?, reason=?, results_path=?, failed_path=?,"
                " processed_seq=? WHERE study_uid=?",
                ("receiving" if not current else ("done" if ok else "failed"), now, outcome, reason[:2000],
                 results_path, failed_path, claim.seq, claim.study_uid))
            if current:
                # The results folder was replaced by this analysis: whatever of the old one was
                # not delivered yet is superseded, and only a successful analysis queues outputs.
                self._enqueue(db, claim.study_uid, (outputs or []) if ok else [], destinations or [], now)
        return current

    def release(self, claim: Claim) -> None:
        """A claimed study that never reached a worker goes back to ``queued`` (the attempt
        is not counted)."""
        with self._tx() as db:
            db.execute("UPDATE studies SET status='queued', attempts=MAX(0, attempts-1)"
                       " WHERE study_uid=? AND status='processing'", (claim.study_uid,))

    def restart_quiet_periods(self, now: float | None = None) -> list[str]:
        """After a restart: studies still receiving get a whole quiet period from now.

        While the node was down its peers could not send; the rest of a study cut off by the
        stop arrives when they retry, and it should join the same analysis rather than find
        the study's quiet period over and trigger a second one. Returns the studies concerned.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute("UPDATE studies SET last_received=? WHERE status='receiving' AND last_received < ?"
                              " RETURNING study_uid", (now, now)).fetchall()
        return [r["study_uid"] for r in rows]

    def requeue_interrupted(self) -> list[str]:
        """After a restart: analyses that were running are queued again; returns them."""
        with self._tx() as db:
            rows = db.execute(
                "UPDATE studies SET status='queued' WHERE status='processing' RETURNING study_uid").fetchall()
        return [r["study_uid"] for r in rows]

    def study(self, study_uid: str) -> dict[str, Any] | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None:
                return None
            n = db.execute("SELECT COUNT(*) AS n FROM instances WHERE study_uid=?", (study_uid,)).fetchone()
        return dict(row, instances=n["n"])

    def studies_waiting(self) -> int:
        """Studies being received, queued or analysed (the node's own fine-tune yields to them)."""
        with self._tx() as db:
            return int(db.execute("SELECT COUNT(*) FROM studies WHERE status IN ('receiving', 'queued', 'processing')"
                                  ).fetchone()[0])

    def is_node_output(self, sop_instance_uid: str) -> bool:
        """Whether the node produced this instance (it is in the outbox, whatever its status)."""
        with self._tx() as db:
            return db.execute("SELECT 1 FROM outbox WHERE sop_instance_uid=? LIMIT 1",
                              (sop_instance_uid,)).fetchone() is not None

    def node_outputs(self, study_uid: str, sop_class_uid: str) -> list[str]:
        """SOP Instance UIDs of the node's current (not superseded) results of a study of one class."""
        with self._tx() as db:
            rows = db.execute("SELECT DISTINCT sop_instance_uid FROM outbox WHERE study_uid=? AND sop_class_uid=?"
                              " AND status != 'superseded' ORDER BY id", (study_uid, sop_class_uid)).fetchall()
        return [r["sop_instance_uid"] for r in rows]

    def series_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOP Instance UIDs recorded for one series of a study."""
        with self._tx() as db:
            rows = db.execute("SELECT sop_instance_uid FROM instances WHERE study_uid=? AND series_uid=?",
                              (study_uid, series_uid)).fetchall()
        return [r["sop_instance_uid"] for r in rows]

    # ---- retention -------------------------------------------------------------------------

    def expired_studies(self, finished_before: float) -> list[dict[str, Any]]:
        """Studies that may be forgotten: finished (done or failed) before ``finished_before``
        (Unix time, s), nothing counted arrived since, no result still pending or dead."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM studies s WHERE status IN ('done', 'failed') AND finished_at IS NOT NULL"
                " AND finished_at < ? AND last_received <= finished_at"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid"
                "                 AND o.status IN ('pending', 'dead')) ORDER BY finished_at",
                (finished_before,)).fetchall()
        return [dict(r) for r in rows]

    def forget_study(self, study: dict[str, Any]) -> bool:
        """Delete a study's rows (studies, instances, outbox) if it is still as ``study`` (a row
        of :meth:`expired_studies`) left it: same status, no arrival since; False otherwise."""
        with self._tx() as db:
            row = db.execute("SELECT status, received_seq, finished_at FROM studies WHERE study_uid=?",
                             (study["study_uid"],)).fetchone()
            if row is None or (row["status"], row["received_seq"], row["finished_at"]) != (
                    study["status"], study["received_seq"], study["finished_at"]):
                return False
            for table in ("outbox", "instances", "studies"):
                db.execute(f"DELETE FROM {table} WHERE study_uid=?", (study["study_uid"],))
        return True

    # ---- outbox ----------------------------------------------------------------------------

    def enqueue_outputs(self, study_uid: str, objects: list[tuple[Path, str, str]], destinations: list[str],
                        now: float | None = None) -> int:
        """Queue every (path, SOP Class UID, SOP Instance UID) for every destination.

        Earlier unsent items of the study are superseded. An object whose SOP Instance UID
        was sent before is sent again (pending, attempts reset): the analysis is new, and
        with deterministic UIDs the PACS simply overwrites or ignores the identical object.
        Returns the number of items queued.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            self._enqueue(db, study_uid, objects, destinations, now)
        return len(objects) * len(destinations)

    @staticmethod
    def _enqueue(db: sqlite3.Connection, study_uid: str, objects: list[tuple[Path, str, str]],
                 destinations: list[str], now: float) -> None:
        db.execute("UPDATE outbox SET status='superseded' WHERE study_uid=? AND status IN ('pending','dead')",
                   (study_uid,))
        for path, sop_class, sop_uid in objects:
            for dest in destinations:
                db.execute(
                    "INSERT INTO outbox (study_uid, path, sop_class_uid, sop_instance_uid, destination, status,"
                    " attempts, next_attempt_at, created_at) VALUES (?,?,?,?,?, 'pending', 0, ?, ?)"
                    " ON CONFLICT(sop_instance_uid, destination) DO UPDATE SET study_uid=excluded.study_uid,"
                    " path=excluded.path, sop_class_uid=excluded.sop_class_uid, status='pending', attempts=0,"
                    " next_attempt_at=excluded.next_attempt_at, last_status=NULL, sent_at=NULL",
                    (study_uid, str(path), sop_class, sop_uid, dest, now, now))

    def due_items(self, now: float | None = None, limit: int = 200) -> list[OutboxItem]:
        """Pending items whose next attempt is due, oldest first."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM outbox WHERE status='pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (now, limit)).fetchall()
        return [OutboxItem(r["id"], r["study_uid"], Path(r["path"]), r["sop_class_uid"], r["sop_instance_uid"],
                           r["destination"], r["attempts"]) for r in rows]

    def next_due_in_s(self, now: float | None = None) -> float | None:
        """Seconds until the next pending item is due (None when nothing is pending)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT MIN(next_attempt_at) AS t FROM outbox WHERE status='pending'").fetchone()
        return None if row["t"] is None else max(0.0, row["t"] - now)

    def mark_sent(self, item_id: int, dimse_status: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE outbox SET status='sent', attempts=attempts+1, sent_at=?, last_status=?"
                       " WHERE id=? AND status='pending'", (now, dimse_status, item_id))

    def mark_failed(self, item_id: int, error: str, send_retries: int, backoff_s: float, backoff_max_s: float,
                    now: float | None = None) -> str:
        """Record a failed attempt; after ``1 + send_retries`` attempts the item is ``dead``.

        Returns the item's status afterwards (``pending`` or ``dead``).
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT attempts, status FROM outbox WHERE id=?", (item_id,)).fetchone()
            if row is None or row["status"] != "pending":
                return row["status"] if row else "superseded"
            attempts = row["attempts"] + 1
            status = "dead" if attempts > send_retries else "pending"
            db.execute("UPDATE outbox SET status=?, attempts=?, next_attempt_at=?, last_status=? WHERE id=?",
                       (status, attempts, now + backoff_delay_s(attempts, backoff_s, backoff_max_s), error[:500],
                        item_id))
        return status

    # ---- node info and status --------------------------------------------------------------

    def set_info(self, **values: Any) -> None:
        with self._tx() as db:
            for key, value in values.items():
                db.execute("INSERT INTO node_info (key, value) VALUES (?, ?)"
                           " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, str(value)))

    def summary(self, recent: int = 20) -> dict[str, Any]:
        """Counts by status, the most recent studies, the dead letters and node info."""
        with self._tx() as db:
            studies = {s: 0 for s in STUDY_STATUSES}
            for r in db.execute("SELECT status, COUNT(*) AS n FROM studies GROUP BY status"):
                studies[r["status"]] = r["n"]
            outbox = {s: 0 for s in OUTBOX_STATUSES}
            for r in db.execute("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status"):
                outbox[r["status"]] = r["n"]
            n_instances = db.execute("SELECT COUNT(*) AS n FROM instances").fetchone()["n"]
            recent_rows = db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid) AS instances,"
                " (SELECT COUNT(*) FROM outbox o WHERE o.study_uid=s.study_uid AND o.status='sent') AS sent,"
                " (SELECT COUNT(*) FROM outbox o WHERE o.study_uid=s.study_uid AND o.status='pending') AS pending,"
                " (SELECT COUNT(*) FROM outbox o WHERE o.study_uid=s.study_uid AND o.status='dead') AS dead"
                " FROM studies s ORDER BY s.last_received DESC LIMIT ?", (recent,)).fetchall()
            dead = db.execute("SELECT * FROM outbox WHERE status='dead' ORDER BY id DESC LIMIT 50").fetchall()
            info = {r["key"]: r["value"] for r in db.execute("SELECT key, value FROM node_info")}
        return {
            "studies": studies,
            "studies_total": sum(studies.values()),
            "instances_total": n_instances,
            "outbox": outbox,
            "recent_studies": [dict(r, study_hash=uid_hash(r["study_uid"])) for r in recent_rows],
            "dead_letters": [dict(r) for r in dead],
            "node": info,
        }

    def outbox_rows(self, study_uid: str) -> list[dict[str, Any]]:
        with self._tx() as db:
            return [dict(r) for r in db.execute("SELECT * FROM outbox WHERE study_uid=? ORDER BY id", (study_uid,))]


class _Transaction:
    """``with``: one immediate transaction under the store's lock (commit, or roll back on error)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, begin: str) -> None:
        self._db, self._lock, self._begin = db, lock, begin

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute(self._begin)
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._db.execute("COMMIT")
            else:
                self._db.execute("ROLLBACK")
        finally:
            self._lock.release()
