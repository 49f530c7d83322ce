"""The node under load, crashes, an outage of its destination, SIGTERM and a hung analysis.

Each test starts ``python -m app serve`` (its own process group) and the project's archive
(``python -m app.node.archive``, journalling every reception) as PACS on free loopback
ports, and stops them at the end. Instances are sent by pynetdicom SCUs; an instance counts
as acknowledged only when the node answered 0x0000. :func:`reliability.harness.account`
then checks, per study: every acknowledged instance is in the spool and was seen by the
final analysis, every result object of that analysis reached the archive, and the archive
got no object outside that one set (a resend after a crash may repeat an object, with the
same SOP Instance UID and the same bytes).

Needs the model bundle (models/paraspinal_t2ax or $PARASPINAL_TEST_MODEL); skipped without.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from app.node.audit import read_audit
from app.node.logs import uid_hash
from app.node.net import free_tcp_port
from reliability.harness import (
    HOST,
    account,
    crash_cycle,
    find_model,
    format_accounts,
    make_codec_crash_study,
    make_study,
    max_overlap,
    node_status,
    send_concurrently,
    send_study_files,
    start_archive,
    start_node,
    wait_until,
)

MODEL = find_model()
pytestmark = pytest.mark.skipif(MODEL is None, reason="no model bundle in models/ (nor PARASPINAL_TEST_MODEL)")
STUDY_TIMEOUT_S = 240.0


def _check(accounts, allow_resent_duplicates: bool = False) -> None:
    table = format_accounts(accounts)
    for a in accounts:
        assert a.status == "done", table
        assert a.acknowledged == a.sent and a.stored == a.acknowledged and a.analysed == a.acknowledged, table
        assert a.outputs >= 3 and a.delivered == a.outputs, table  # SEG(s), SR, PDF
        assert a.foreign == 0 and a.changed_duplicates == 0 and a.lost == 0, table
        if not allow_resent_duplicates:
            assert a.duplicates == 0 and a.receptions == a.outputs, table


def test_load_eight_associations_five_studies_of_thirty_plus_instances(tmp_path):
    """5 studies x 32 instances, each study split over 8 concurrent associations (all 8 open
    before any sends, so every association carries instances of every study)."""
    archive = start_archive(tmp_path / "archive")
    node = start_node(tmp_path / "node", MODEL, quiet_period_s=2.0, workers=2, max_associations=12, wait_ready=False,
                      destinations=[{"ae_title": "ARCHIVE", "host": HOST, "port": archive.port}])
    try:
        studies = [make_study(tmp_path / f"study{i}", seed=100 + i, n_slices=5, min_instances=32) for i in range(5)]
        files = [p for s in studies for p in s.paths]
        jobs = [(f"LOAD{k}", files[k::8]) for k in range(8)]
        statuses = send_concurrently(jobs, node.port)
        assert sum(1 for s in statuses.values() if s == 0) == len(files) == 160
        for study in studies:
            node.wait_delivered(study.study_uid, STUDY_TIMEOUT_S)
        accounts = account(node, archive, studies, statuses)
        print("\n" + format_accounts(accounts))
        _check(accounts)
        overlap = max_overlap(read_audit(tmp_path / "node" / "audit.jsonl"), {ae for ae, _ in jobs})
        assert overlap == 8
    finally:
        node.stop()
        archive.stop()


def test_killed_during_reception_analysis_and_sending_loses_nothing_and_sends_each_result_once(tmp_path):
    """SIGKILL of the node's whole process group (node and workers), twice:

    1. while study X is analysed and study Y is half received (acknowledged instances so
       far are kept; the sender, like a PACS, sends Y again after the restart);
    2. while X's results are being sent to a slow archive (0.7 s per C-STORE).

    After each restart: X is analysed again, Y (with a fresh quiet period, so its re-sent
    remainder joins the same analysis) is analysed once, and every result arrives: a result
    in flight at the kill may arrive twice, as the same SOP Instance UID with the same bytes.
    """
    archive = start_archive(tmp_path / "archive", store_delay_s=0.7)
    settings = dict(quiet_period_s=3.0, workers=1, send_retries=50, send_backoff_s=0.5, send_backoff_max_s=2.0,
                    destinations=[{"ae_title": "ARCHIVE", "host": HOST, "port": archive.port}])
    node = start_node(tmp_path / "node", MODEL, **settings)
    try:
        cycle = crash_cycle(node, archive, tmp_path, seed=201)
        node = cycle.node
        x, y = cycle.studies
        assert cycle.kills == 2 and 10 <= cycle.partial_acks < len(y.paths)
        assert 1 <= cycle.delivered_before_second_kill < 3
        statuses = {p: 0 if p in cycle.acknowledged else None for p in x.paths + y.paths}
        accounts = account(node, archive, [x, y], statuses)
        print("\n" + format_accounts(accounts))
        _check(accounts, allow_resent_duplicates=True)
        text = node.log_text()
        assert text.count("event=node_resumed") == 3
        # Y's analysis may have been cut short by the second kill too; one analysis finished.
        assert text.count(f"event=analysis_done study={y.study_uid}") == 1
    finally:
        node.stop()
        archive.stop()


def test_destination_down_results_wait_backoff_is_bounded_and_a_lost_cause_is_a_visible_dead_letter(tmp_path):
    """Two destinations: LATE is down while the study is analysed and until its results have
    been refused twice each, then comes up; NEVER never does. LATE gets every result once it
    is up; each NEVER item is tried 1 + send_retries times, the waits between tries never
    above send_backoff_max_s, then is a dead letter shown by ``python -m app status`` (and
    ``--json``)."""
    late_port, never_port = free_tcp_port(), free_tcp_port()
    node = start_node(tmp_path / "node", MODEL, quiet_period_s=1.0, send_retries=8, send_backoff_s=0.25,
                      send_backoff_max_s=1.0, wait_ready=False,
                      destinations=[{"ae_title": "LATE", "host": HOST, "port": late_port},
                                    {"ae_title": "NEVER", "host": HOST, "port": never_port}])
    archive = None
    study = make_study(tmp_path / "study", seed=301, n_slices=4)
    try:
        statuses = dict(send_study_files(study.paths, node.port, "SCU"))
        wait_until(lambda: (rows := node.outbox(study.study_uid)) and all(r["attempts"] >= 2 for r in rows),
                   STUDY_TIMEOUT_S, "two failed attempts per result", interval_s=0.2, alive=node.alive)
        assert all(r["status"] == "pending" for r in node.outbox(study.study_uid))  # waiting in the outbox
        archive = start_archive(tmp_path / "archive", ae_title="LATE", port=late_port)
        wait_until(lambda: all(r["status"] in ("sent", "dead") for r in node.outbox(study.study_uid)), 120,
                   "every item sent or dead", interval_s=0.3, alive=node.alive)
        rows = node.outbox(study.study_uid)
        late = [r for r in rows if r["destination"].startswith("LATE@")]
        never = [r for r in rows if r["destination"].startswith("NEVER@")]
        assert late and all(r["status"] == "sent" and r["attempts"] >= 3 for r in late)
        assert never and all(r["status"] == "dead" and r["attempts"] == 9 for r in never)
        accounts = account(node, archive, [study], statuses)
        print("\n" + format_accounts(accounts))
        _check(accounts)
        # Backoff: the tries of one item, from the audit trail, are never further apart than
        # the cap (plus the time a refused connection and a sender round take).
        sends = [e for e in read_audit(tmp_path / "node" / "audit.jsonl") if e["event"] == "send"
                 and e["destination"].startswith("NEVER@")]
        from datetime import datetime

        by_sop: dict[str, list[float]] = {}
        for e in sends:
            by_sop.setdefault(e["sop"], []).append(datetime.strptime(e["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp())
        for times in by_sop.values():
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert len(times) == 9 and max(gaps) <= 1.0 + 1.5 and min(gaps) >= 0.2, gaps
        assert [e["result"] for e in sends].count("dead") == len(never)
        status = node_status(node)
        assert "Dead letters" in status.stdout and f"NEVER@{HOST}:{never_port}" in status.stdout
        summary = json.loads(node_status(node, "--json").stdout)
        assert summary["outbox"]["dead"] == len(never)
    finally:
        node.stop()
        if archive is not None:
            archive.stop()


def test_sigterm_during_analysis_persists_or_finishes_it_and_nothing_is_lost(tmp_path):
    """SIGTERM twice, each during the study's analysis:

    1. to the node alone (as ``docker stop`` does) with a grace period shorter than the
       analysis (``PARASPINAL__NODE__SHUTDOWN_GRACE_S=0.3`` for this run): the node exits 0,
       the study is left in progress (not failed), the health check says unhealthy;
    2. after the restart (grace 30 s), to the whole process group (as systemd or a terminal
       would) while the study is analysed again: the node exits 0 and the analysis either
       finishes within the grace period (its results queued) or is left in progress;
    3. after the next restart the study is done and its results are delivered once.

    The node logs with log_uids: hashed, and no UID of the study appears in its log."""
    archive = start_archive(tmp_path / "archive")
    settings = dict(quiet_period_s=1.0, shutdown_grace_s=30.0, log_uids="hashed",
                    destinations=[{"ae_title": "ARCHIVE", "host": HOST, "port": archive.port}])
    node = start_node(tmp_path / "node", MODEL, env={"PARASPINAL__NODE__SHUTDOWN_GRACE_S": "0.3"}, **settings)
    study = make_study(tmp_path / "study", seed=401, n_slices=8)
    try:
        health = node_status(node, "--health")
        assert health.returncode == 0 and health.stdout.startswith("healthy"), health.stdout + health.stderr
        statuses = dict(send_study_files(study.paths, node.port, "SCU"))
        wait_until(lambda: (node.study(study.study_uid) or {}).get("status") == "processing", 60, "analysis",
                   interval_s=0.1, alive=node.alive)
        time.sleep(0.3)
        node.process.send_signal(signal.SIGTERM)  # 1. the node alone, short grace
        assert node.process.wait(timeout=60) == 0
        node.stop()
        assert node.study(study.study_uid)["status"] == "processing"
        assert node.events("analyses_interrupted", this_run_only=True)
        health = node_status(node, "--health")
        assert health.returncode == 1 and health.stdout.startswith("unhealthy"), health.stdout

        node = node.restart()
        assert "requeued=1" in node.log_text(this_run_only=True)
        wait_until(lambda: node.events("analysis_started", this_run_only=True), 60, "the analysis again",
                   interval_s=0.1, alive=node.alive)
        time.sleep(0.3)
        node.kill_group(signal.SIGTERM)  # 2. the whole process group, long grace
        assert node.process.wait(timeout=90) == 0
        node.stop()
        assert node.study(study.study_uid)["status"] in ("done", "processing")
        assert not node.events("analysis_failed")

        node = node.restart(wait_ready=False)
        node.wait_delivered(study.study_uid, STUDY_TIMEOUT_S)
        accounts = account(node, archive, [study], statuses)
        print("\n" + format_accounts(accounts))
        _check(accounts)
        text = node.log_text()
        assert f"uid:{uid_hash(study.study_uid)}" in text
        assert study.study_uid not in text and not any(sop in text for sop in study.sops.values())
    finally:
        node.stop()
        archive.stop()


def test_a_crashing_or_hung_analysis_fails_alone_and_the_node_goes_on(tmp_path):
    """Two studies that must not take the node down, on one node (analysis_timeout_s 1.5):

    1. RLE pixel data that make the Rust RLE decoder panic (found by the fuzzer; pyo3's
       PanicException is no Exception, so it passes the pipeline's per-study error handling):
       the node acknowledges the instances (valid DICOM), the study fails with that reason
       and is kept, the worker process is replaced;
    2. a study whose analysis takes longer than the limit: it is stopped (its worker killed
       and replaced), failed with the reason and kept, nothing is sent.

    The first replacement worker takes the second study; the node keeps serving (health check)."""
    node = start_node(tmp_path / "node", MODEL, quiet_period_s=0.5, analysis_timeout_s=1.5, wait_ready=False)
    try:
        poison = make_codec_crash_study(tmp_path / "poison")
        assert all(s == 0 for _, s in send_study_files(poison.paths, node.port, "SCU"))
        wait_until(lambda: (node.study(poison.study_uid) or {}).get("status") == "failed", 120, "the panic",
                   interval_s=0.2, alive=node.alive)
        assert "PanicException" in node.study(poison.study_uid)["reason"]
        assert (tmp_path / "node" / "failed" / poison.study_uid / "reason.txt").is_file()

        study = make_study(tmp_path / "study", seed=501, n_slices=20, rows=128)  # several seconds of analysis
        assert all(s == 0 for _, s in send_study_files(study.paths, node.port, "SCU"))
        wait_until(lambda: (node.study(study.study_uid) or {}).get("status") == "failed", 120, "the time limit",
                   interval_s=0.2, alive=node.alive)
        row = node.study(study.study_uid)
        assert "analysis time limit exceeded" in row["reason"]
        kept = tmp_path / "node" / "failed" / study.study_uid
        assert "analysis_timeout_s" in (kept / "reason.txt").read_text()
        assert len(list((kept / "instances").glob("*/*.dcm"))) == len(study.paths)
        assert node.outbox(study.study_uid) == [] and node.outbox(poison.study_uid) == []
        assert node.events("analysis_timeout")
        assert len(node.events("worker_ready")) >= 2  # the replacement analysed the second study
        assert node_status(node, "--health").returncode == 0
    finally:
        node.stop()
