"""The node under load, crashes, an outage of its destination, SIGTERM, a decoder panic and a
hung analysis.

Each test starts ``python -m app serve`` (its own process group) and the project's archive
(``python -m app.node.archive``, journalling every reception) as PACS on free loopback
ports, and stops them at the end. Instances are sent by pynetdicom SCUs
(:mod:`reliability.scu`); an instance counts as acknowledged only when the node answered
0x0000. :func:`reliability.harness.account` then checks, per study: every acknowledged
instance is in the spool and was seen by the final analysis, every result object of that
analysis reached the archive, and the archive holds exactly one result set (no object
outside it; a resend after a crash may repeat an object, with the same SOP Instance UID and
the same bytes: a re-sent instance, not a second set).

The counts here are small to keep ``make test`` short (5 studies under load, one crash
cycle); ``make soak`` runs the same scenarios at length.

Needs the model bundle (models/paraspinal_t2ax or $PARASPINAL_TEST_MODEL); skipped without.
"""

from __future__ import annotations

import json
import shutil
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
    load_run,
    make_study,
    node_status,
    node_with_archive,
    start_archive,
    start_node,
    wait_until,
)
from paraspinal.model_bundle import find_bundle
from reliability.scu import send_files

MODEL = find_model()
pytestmark = pytest.mark.skipif(MODEL is None, reason="no model bundle in models/ (nor PARASPINAL_TEST_MODEL)")
STUDY_TIMEOUT_S = 240.0


def _check(accounts, allow_resent_duplicates: bool = False) -> None:
    """Nothing lost, exactly one result set per study at the archive (re-sent instances, the
    same UID and bytes again after a crash, only where allowed)."""
    table = format_accounts(accounts)
    for a in accounts:
        assert a.status == "done", table
        assert a.acknowledged == a.sent and a.stored == a.acknowledged and a.analysed == a.acknowledged, table
        assert a.outputs >= 3 and a.delivered == a.outputs, table  # SEG(s), SR, PDF
        assert a.foreign == 0 and a.changed_duplicates == 0 and a.lost == 0, table
        assert a.result_sets == 1 and a.duplicate_result_sets == 0, table
        if not allow_resent_duplicates:
            assert a.duplicates == 0 and a.receptions == a.outputs, table


def test_load_eight_associations_five_studies_of_thirty_plus_instances(tmp_path):
    """5 studies x 32 instances (the guarantee's minimum), each study split over 8 concurrent
    associations (all 8 open before any sends, so every association carries instances of every
    study); 2 workers. (``make soak``: 20 studies.)"""
    run = load_run(tmp_path, MODEL, n_studies=5, seed=100, quiet_period_s=1.5, timeout_s=STUDY_TIMEOUT_S)
    assert sum(1 for s in run.statuses.values() if s == 0) == len(run.statuses) == 160
    print("\n" + format_accounts(run.accounts))
    _check(run.accounts)
    assert run.overlap == 8


def test_killed_during_reception_analysis_and_sending_loses_nothing_and_sends_one_result_set(tmp_path):
    """SIGKILL of the node's whole process group (node and workers), twice:

    1. while study X is analysed and study Y is half received (acknowledged instances so
       far are kept; the sender, like a PACS, sends Y again after the restart);
    2. while X's results are being sent to a slow archive (0.5 s per C-STORE).

    After each restart: X is analysed again, Y (with a fresh quiet period, so its re-sent
    remainder joins the same analysis) is analysed once, and every result arrives. Each study
    has exactly one result set at the archive (one SEG and one SR SOP Instance UID): a result
    in flight at the kill may arrive again, as the same SOP Instance UID with the same bytes
    (a re-sent instance, idempotent at a PACS), never as a second set.
    """
    with node_with_archive(tmp_path, MODEL, store_delay_s=0.5, wait_ready=False, quiet_period_s=2.0, workers=1,
                           send_retries=50, send_backoff_s=0.5, send_backoff_max_s=2.0) as rig:
        cycle = crash_cycle(rig.node, rig.archive, tmp_path, seed=201)
        rig.node = node = cycle.node
        x, y = cycle.studies
        assert cycle.kills == 2 and 10 <= cycle.partial_acks < len(y.paths)
        assert 1 <= cycle.delivered_before_second_kill < 3
        statuses = {p: 0 if p in cycle.acknowledged else None for p in x.paths + y.paths}
        accounts = account(node, rig.archive, [x, y], statuses)
        print("\n" + format_accounts(accounts))
        _check(accounts, allow_resent_duplicates=True)
        for a in accounts:  # single-stack studies: one SEG, the SR and the viewer SR, however often each arrived
            assert (a.seg_uids, a.sr_uids, a.srs_per_set) == (1, 2, 2), format_accounts(accounts)
        text = node.log_text()
        assert text.count("event=node_resumed") == 3
        # Y's analysis may have been cut short by the second kill too; one analysis finished.
        assert text.count(f"event=analysis_done study={y.study_uid}") == 1


def test_destination_down_results_wait_backoff_is_bounded_and_a_lost_cause_is_a_visible_dead_letter(tmp_path):
    """Two destinations: LATE is down while the study is analysed and until its results have
    been refused twice each, then comes up; NEVER never does. LATE gets every result once it
    is up; each NEVER item is tried 1 + send_retries (5) times, the waits between tries
    doubling from 0.25 s and never above send_backoff_max_s (1 s), then is a dead letter shown
    by ``python -m app status`` (and ``--json``)."""
    late_port, never_port = free_tcp_port(), free_tcp_port()
    node = start_node(tmp_path / "node", MODEL, quiet_period_s=1.0, send_retries=5, send_backoff_s=0.25,
                      send_backoff_max_s=1.0, wait_ready=False,
                      destinations=[{"ae_title": "LATE", "host": HOST, "port": late_port},
                                    {"ae_title": "NEVER", "host": HOST, "port": never_port}])
    archive = None
    study = make_study(tmp_path / "study", seed=301, n_slices=4)
    try:
        statuses = dict(send_files(study.paths, node.port, "SCU"))
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
        assert never and all(r["status"] == "dead" and r["attempts"] == 6 for r in never)
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
            assert len(times) == 6 and max(gaps) <= 1.0 + 1.5 and min(gaps) >= 0.2, gaps
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
    with node_with_archive(tmp_path, MODEL, wait_ready=False, env={"PARASPINAL__NODE__SHUTDOWN_GRACE_S": "0.3"},
                           quiet_period_s=1.0, shutdown_grace_s=30.0, log_uids="hashed") as rig:
        study = make_study(tmp_path / "study", seed=401, n_slices=6)  # while the worker loads the model
        node = rig.node.wait_ready()
        health = node_status(node, "--health")
        assert health.returncode == 0 and health.stdout.startswith("healthy"), health.stdout + health.stderr
        statuses = dict(send_files(study.paths, node.port, "SCU"))
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

        node = rig.restart()
        assert "requeued=1" in node.log_text(this_run_only=True)
        wait_until(lambda: node.events("analysis_started", this_run_only=True), 60, "the analysis again",
                   interval_s=0.1, alive=node.alive)
        time.sleep(0.3)
        node.kill_group(signal.SIGTERM)  # 2. the whole process group, long grace
        assert node.process.wait(timeout=90) == 0
        node.stop()
        assert node.study(study.study_uid)["status"] in ("done", "processing")
        assert not node.events("analysis_failed")

        node = rig.restart(wait_ready=False)
        node.wait_delivered(study.study_uid, STUDY_TIMEOUT_S)
        accounts = account(node, rig.archive, [study], statuses)
        print("\n" + format_accounts(accounts))
        _check(accounts)
        text = node.log_text()
        assert f"uid:{uid_hash(study.study_uid)}" in text
        assert study.study_uid not in text and not any(sop in text for sop in study.sops.values())


def test_a_decoder_panic_or_a_hung_analysis_fails_alone_and_the_node_goes_on(tmp_path):
    """Two studies that must not take the node down, on one node (analysis_timeout_s 1.5):

    1. RLE pixel data that make the Rust RLE decoder panic (pyo3's PanicException derives
       from BaseException, not Exception; :func:`reliability.harness.rle_overflow_frame`):
       the node acknowledges the instances (valid DICOM); the pipeline fails the study in
       stage "load" naming the file, the study is kept with that reason, and the worker
       process lives on (the panic is the study's failure, not the worker's);
    2. a study whose analysis takes longer than the limit: it is stopped (its worker killed
       and replaced), failed with the reason and kept, nothing is sent.

    The node keeps serving (health check) and a replacement worker comes up."""
    node = start_node(tmp_path / "node", MODEL, quiet_period_s=0.5, analysis_timeout_s=1.5, wait_ready=False)
    try:
        # Both studies are made while the worker loads the model.
        poison = make_codec_crash_study(tmp_path / "poison")
        study = make_study(tmp_path / "study", seed=501, n_slices=12, rows=96)  # several seconds of analysis
        assert all(s == 0 for _, s in send_files(poison.paths, node.port, "SCU"))
        wait_until(lambda: (node.study(poison.study_uid) or {}).get("status") == "failed", 120, "the panic",
                   interval_s=0.2, alive=node.alive)
        reason = node.study(poison.study_uid)["reason"]
        poisoned_file = f"{poison.sops[poison.paths[0]]}.dcm"  # as spooled: <SOP Instance UID>.dcm
        assert "pixel data could not be decoded" in reason and poisoned_file in reason, reason
        assert "PanicException" in reason, reason
        kept = tmp_path / "node" / "failed" / poison.study_uid
        assert (kept / "reason.txt").is_file()
        assert json.loads((kept / "result.json").read_text())["failed_stage"] == "load"
        assert not node.events("worker_pool_broken") and len(node.events("worker_ready")) == 1

        assert all(s == 0 for _, s in send_files(study.paths, node.port, "SCU"))
        wait_until(lambda: (node.study(study.study_uid) or {}).get("status") == "failed", 120, "the time limit",
                   interval_s=0.2, alive=node.alive)
        row = node.study(study.study_uid)
        assert "analysis time limit exceeded" in row["reason"]
        kept = tmp_path / "node" / "failed" / study.study_uid
        assert "analysis_timeout_s" in (kept / "reason.txt").read_text()
        assert len(list((kept / "instances").glob("*/*.dcm"))) == len(study.paths)
        assert node.outbox(study.study_uid) == [] and node.outbox(poison.study_uid) == []
        assert node.events("analysis_timeout")
        wait_until(lambda: len(node.events("worker_ready")) >= 2, 60, "a replacement worker", alive=node.alive)
        assert node_status(node, "--health").returncode == 0
    finally:
        node.stop()


def test_a_worker_that_cannot_load_the_model_makes_the_node_unhealthy_and_fails_studies_with_the_reason(tmp_path):
    """A model bundle whose weights cannot be loaded (not TorchScript): the node starts and
    answers C-ECHO, but ``status --health`` (the container's HEALTHCHECK) exits 1 naming the
    worker's load error, and a study sent meanwhile fails with that reason instead of hanging."""
    broken = tmp_path / "models" / "broken_bundle"
    shutil.copytree(find_bundle(MODEL), broken)
    (broken / "models" / "model.ts").write_bytes(b"not a TorchScript archive\n")
    node = start_node(tmp_path / "node", broken.parent, quiet_period_s=0.5, wait_ready=False)
    try:
        wait_until(lambda: node.events("worker_load_error"), 120, "the worker's load error", alive=node.alive)
        health = node_status(node, "--health")
        assert health.returncode == 1, health.stdout + health.stderr
        assert health.stdout.startswith("unhealthy: no analysis worker can analyse: "), health.stdout
        assert "model.ts" in health.stdout or "RuntimeError" in health.stdout, health.stdout
        study = make_study(tmp_path / "study", seed=601, n_slices=4)
        assert all(s == 0 for _, s in send_files(study.paths, node.port, "SCU"))
        wait_until(lambda: (node.study(study.study_uid) or {}).get("status") == "failed", 60, "the study to fail",
                   interval_s=0.2, alive=node.alive)
        assert node.study(study.study_uid)["reason"].split(":")[0] in health.stdout
        assert node_status(node, "--health").returncode == 1
    finally:
        node.stop()
