"""The node's parts without the model: spool, state, listener (with DCMTK peers), sender.

Every listener runs in this process on a free loopback port and is stopped by its fixture;
DCMTK ``echoscu``/``storescu``/``storescp`` are the real peers.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE

from app.config import AllowedPeer, PeerAddress, load_config
from app.node import spool as spool_module
from app.node.completion import CompletionTracker
from app.node.listener import ACCEPTED_TRANSFER_SYNTAXES, Listener
from app.node.net import free_tcp_port
from app.node.sender import Sender, store_files
from app.node.spool import InvalidUID, Spool, atomic_write, validate_uid
from app.node.state import Claim, InstanceArrival, StateStore, backoff_delay_s, destination_key
from app.node.status import format_status
from paraspinal.synthetic_study import make_synthetic_study
from tests.peers import HOST, start_storescp, tool_available

needs_dcmtk = pytest.mark.skipif(not tool_available("storescu"),
                                 reason="DCMTK (storescu/echoscu/storescp) not installed")


def _settings(tmp_path: Path, **overrides):
    base = load_config(environ={}).node
    values = dict(port=0, bind_address=HOST, spool_dir=tmp_path / "spool", state_db=tmp_path / "state.sqlite3",
                  results_dir=tmp_path / "results", failed_dir=tmp_path / "failed", min_free_disk_mb=1,
                  acse_timeout_s=10, dimse_timeout_s=20, network_timeout_s=20)
    values.update(overrides)
    return dataclasses.replace(base, **values)


def _arrival(study: str, sop: str, outcome: str = "new", series: str = "1.2.3") -> InstanceArrival:
    return InstanceArrival(study, series, sop, MRImageStorage, ExplicitVRLittleEndian, 100, outcome, "SCU")


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: what follows the file meta group, located by
    (0002,0000) File Meta Information Group Length (explicit VR little endian, right after "DICM")."""
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00" and raw[136:138] == b"UL"
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length:]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> object:
    """A small synthetic lumbar study (axial T2 of 4 slices + distractors) in explicit VR LE."""
    return make_synthetic_study(tmp_path_factory.mktemp("small_study"), seed=3, rows=96, cols=96,
                                pixel_spacing=(2.5, 2.5), n_slices=4)


@pytest.fixture
def listener(tmp_path):
    """A listener (no workers) on a free port; allows ECHOSCU, STORESCU, SCU_A, SCU_B from 127.0.0.1."""
    settings = _settings(tmp_path, allowed_peers=tuple(AllowedPeer(ae, HOST) for ae in
                                                        ("ECHOSCU", "STORESCU", "SCU_A", "SCU_B", "PYSCU")))
    state = StateStore(settings.state_db)
    node = Listener(settings, Spool(settings.spool_dir), state)
    node.start()
    yield node
    node.stop()
    state.close()


# ---- spool -------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.4", "1." + "2" * 62])
def test_valid_uids_are_accepted(uid):
    assert validate_uid(uid) == uid


@pytest.mark.parametrize("uid", ["", None, "../../etc", "1.2.3/../4", "1.2.a", "1..2", ".1.2", "1.2.",
                                 "1." + "2" * 63, "1.2.3\x00", " 1.2.3", "/tmp/x"])
def test_invalid_uids_are_refused(uid):
    with pytest.raises(InvalidUID):
        validate_uid(uid)


def test_spool_layout_and_idempotency(tmp_path):
    spool = Spool(tmp_path / "spool")
    first = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"A" * 10)
    assert first.outcome == "new"
    assert first.path == tmp_path / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    mtime = first.path.stat().st_mtime_ns
    again = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"A" * 10)
    assert again.outcome == "duplicate" and again.path.stat().st_mtime_ns == mtime  # not rewritten
    changed = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"B" * 12)
    assert changed.outcome == "changed" and changed.path.read_bytes() == b"B" * 12
    assert [p.name for p in changed.path.parent.iterdir()] == ["1.2.3.4.5.dcm"]  # no temp file left
    assert spool.study_uids() == ["1.2.3"]


def test_spool_refuses_path_escape(tmp_path):
    spool = Spool(tmp_path / "spool")
    for study, series, sop in [("..", "1.2", "1.3"), ("1.2", "../..", "1.3"), ("1.2", "1.3", "../../../x")]:
        with pytest.raises(InvalidUID):
            spool.store(study, series, sop, b"data")
    assert list((tmp_path / "spool").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]


def test_atomic_write_leaves_nothing_when_the_disk_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.dcm"
    atomic_write(target, b"old")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        atomic_write(target, b"new and longer")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"  # the old file untouched, whole
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]  # the temp file was removed


def test_concurrent_stores_of_one_instance_leave_one_whole_file(tmp_path):
    spool = Spool(tmp_path / "spool")
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=spool.store, args=("1.2", "1.2.3", "1.2.3.4", p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = tmp_path / "spool" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert path.read_bytes() in payloads
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.4.dcm"]


# ---- state -------------------------------------------------------------------------------


def test_quiet_period_slides_with_each_instance(tmp_path):
    state = StateStore(tmp_path / "s.db")
    completion = CompletionTracker(state, quiet_period_s=10.0)
    state.record_instance(_arrival("1.1", "1.1.1"), now=100.0)
    state.record_instance(_arrival("1.1", "1.1.2"), now=108.0)
    assert completion.promote_ready(now=115.0) == []  # 7 s after the last instance
    assert completion.seconds_until_next(now=115.0) == pytest.approx(3.0)
    assert completion.promote_ready(now=118.0) == ["1.1"]
    assert state.study("1.1")["status"] == "queued" and state.study("1.1")["instances"] == 2


def test_new_data_after_analysis_triggers_a_new_analysis(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_arrival("1.1", "1.1.1"), now=0.0)
    state.mark_ready(1.0, now=5.0)
    claim = state.claim_next(now=5.0)
    assert claim == Claim("1.1", 1, 1) and state.study("1.1")["status"] == "processing"
    assert state.finish(claim, True, "done", "ok", now=6.0) is True
    assert state.study("1.1")["status"] == "done"
    # The same bytes again: a done study is left alone (no routing loop) ...
    assert state.record_instance(_arrival("1.1", "1.1.1", "duplicate"), now=7.0) == "done"
    # ... a new instance sends it back for another analysis after the quiet period.
    assert state.record_instance(_arrival("1.1", "1.1.2"), now=8.0) == "receiving"
    assert state.mark_ready(1.0, now=8.5) == [] and state.mark_ready(1.0, now=9.0) == ["1.1"]
    assert state.claim_next(now=9.0).attempt == 2


def test_an_instance_on_disk_but_never_recorded_counts_as_new_when_resent(tmp_path):
    """Killed between the spool's rename and the database commit, the node sent no response; the
    peer re-sends, the spool finds the same bytes ("duplicate"), but for the study the instance is
    new: an analysed study must be analysed again with it."""
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_arrival("1.1", "1.1.1"), now=0.0)
    state.mark_ready(1.0, now=2.0)
    state.finish(state.claim_next(now=2.0), True, "done", "ok", now=3.0)
    assert state.record_instance(_arrival("1.1", "1.1.2", "duplicate"), now=4.0) == "receiving"
    # A real duplicate (recorded before) still leaves an analysed study alone.
    state.mark_ready(1.0, now=6.0)
    state.finish(state.claim_next(now=6.0), True, "done", "ok", now=7.0)
    assert state.record_instance(_arrival("1.1", "1.1.2", "duplicate"), now=8.0) == "done"


def test_instances_arriving_during_analysis_supersede_it(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_arrival("1.1", "1.1.1"), now=0.0)
    state.mark_ready(1.0, now=2.0)
    claim = state.claim_next(now=2.0)
    assert state.record_instance(_arrival("1.1", "1.1.2"), now=3.0) == "processing"
    objects = [(tmp_path / "seg.dcm", "1.2.840.10008.5.1.4.1.1.66.4", "1.9.1")]
    assert state.finish(claim, True, "done", "ok", outputs=objects, destinations=["A@h:1"], now=4.0) is False
    assert state.study("1.1")["status"] == "receiving"
    assert state.outbox_rows("1.1") == []  # stale outputs are not sent


def test_failed_study_is_retried_when_resent(tmp_path):
    state = StateStore(tmp_path / "s.db")
    state.record_instance(_arrival("1.1", "1.1.1"), now=0.0)
    state.mark_ready(1.0, now=2.0)
    state.finish(state.claim_next(now=2.0), False, "failed", "boom", now=3.0)
    assert state.study("1.1")["status"] == "failed"
    assert state.record_instance(_arrival("1.1", "1.1.1", "duplicate"), now=4.0) == "receiving"


def test_restart_requeues_interrupted_work_and_adopts_spool_studies(tmp_path):
    path = tmp_path / "s.db"
    state = StateStore(path)
    state.record_instance(_arrival("1.1", "1.1.1"), now=0.0)
    state.mark_ready(1.0, now=2.0)
    state.claim_next(now=2.0)
    state.close()  # the node stops in the middle of the analysis
    state = StateStore(path)
    assert state.requeue_interrupted() == ["1.1"]
    assert state.study("1.1")["status"] == "queued"
    assert state.adopt_spool_studies(["1.1", "1.2"]) == ["1.2"]
    assert state.study("1.2")["status"] == "receiving"


def test_outbox_backoff_dead_letter_and_supersede(tmp_path):
    state = StateStore(tmp_path / "s.db")
    dest = destination_key("PACS", HOST, 104)
    state.enqueue_outputs("1.1", [(tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34", "1.9.2")], [dest], now=0.0)
    (item,) = state.due_items(now=0.0)
    assert state.mark_failed(item.id, "refused", send_retries=2, backoff_s=1.0, backoff_max_s=1.5, now=0.0) == "pending"
    assert state.due_items(now=0.5) == []  # backoff 1 s
    assert state.due_items(now=1.0)
    assert state.mark_failed(item.id, "refused", 2, 1.0, 1.5, now=1.0) == "pending"
    assert state.due_items(now=2.4) == [] and state.due_items(now=2.5)  # 2 s capped at 1.5 s
    assert state.mark_failed(item.id, "refused", 2, 1.0, 1.5, now=2.5) == "dead"  # 1 + 2 retries
    summary = state.summary()
    assert summary["outbox"]["dead"] == 1 and summary["dead_letters"][0]["last_status"] == "refused"
    assert "Dead letters" in format_status(summary)
    # A new analysis of the study supersedes the dead item and queues its own outputs.
    state.enqueue_outputs("1.1", [(tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34", "1.9.3")], [dest], now=3.0)
    assert {r["sop_instance_uid"]: r["status"] for r in state.outbox_rows("1.1")} == {"1.9.2": "superseded",
                                                                                       "1.9.3": "pending"}
    assert [backoff_delay_s(n, 2.0, 60.0) for n in (1, 2, 3, 6, 9)] == [2.0, 4.0, 8.0, 60.0, 60.0]


# ---- listener with real peers --------------------------------------------------------------


@needs_dcmtk
def test_echoscu_gets_success(listener):
    run = subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", "PARASPINAL", HOST, str(listener.port)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr


@needs_dcmtk
def test_peer_not_allowed_is_rejected_at_association(listener):
    run = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "PARASPINAL", HOST, str(listener.port)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert "Association Rejected" in run.stderr and "Calling AE Title Not Recognized" in run.stderr
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(HOST, listener.port, ae_title="PARASPINAL")
    assert assoc.is_rejected and not assoc.is_established


def test_allowed_ae_title_from_another_host_is_rejected(tmp_path):
    settings = _settings(tmp_path, allowed_peers=(AllowedPeer("PYSCU", "10.11.12.13"),))
    state = StateStore(settings.state_db)
    node = Listener(settings, Spool(settings.spool_dir), state)
    node.start()
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate(HOST, node.port, ae_title="PARASPINAL")
        assert assoc.is_rejected
    finally:
        node.stop()
        state.close()


def test_associations_beyond_the_maximum_are_rejected(tmp_path):
    settings = _settings(tmp_path, max_associations=1)
    state = StateStore(settings.state_db)
    node = Listener(settings, Spool(settings.spool_dir), state)
    node.start()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate(HOST, node.port, ae_title="PARASPINAL")
    try:
        assert first.is_established
        second = ae.associate(HOST, node.port, ae_title="PARASPINAL")
        assert second.is_rejected  # rejected-transient, local limit exceeded
    finally:
        first.release()
        node.stop()
        state.close()


@needs_dcmtk
def test_storescu_study_is_spooled_byte_for_byte(listener, small_study):
    run = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PARASPINAL", HOST, str(listener.port),
                          "+sd", "+r", str(small_study.root)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    spool_dir = listener.spool.study_dir(small_study.study_uid)
    spooled = {p.stem: p for p in spool_dir.glob("*/*.dcm")}
    assert len(spooled) == len(small_study.all_paths)
    for source in small_study.all_paths:
        sop = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_bytes(spooled[sop]) == _dataset_bytes(source)  # the data set exactly as sent
        meta = pydicom.filereader.read_file_meta_info(spooled[sop])
        assert meta.MediaStorageSOPInstanceUID == sop
    study = listener.state.study(small_study.study_uid)
    assert study["status"] == "receiving" and study["instances"] == len(small_study.all_paths)


def test_compressed_transfer_syntaxes_are_stored_as_received(listener, tmp_path):
    """One file per syntax the generator writes, each sent in its own syntax (no conversion)."""
    for syntax in ("implicit_little", "deflate", "jpeg_lossless", "jpeg_ls", "jpeg2000_lossless", "rle"):
        study = make_synthetic_study(tmp_path / syntax, seed=5, rows=32, cols=32, pixel_spacing=(8.0, 8.0),
                                     n_slices=1, include_distractors=False, transfer_syntax=syntax)
        (source,) = study.all_paths
        (outcome,) = store_files([source], "PYSCU", "PARASPINAL", HOST, listener.port)
        assert outcome[1] == 0, (syntax, outcome)
        (stored,) = listener.spool.study_dir(study.study_uid).glob("*/*.dcm")
        source_meta = pydicom.filereader.read_file_meta_info(source)
        assert pydicom.filereader.read_file_meta_info(stored).TransferSyntaxUID == source_meta.TransferSyntaxUID
        assert _dataset_bytes(stored) == _dataset_bytes(source), syntax


def test_every_advertised_transfer_syntax_is_accepted(listener):
    for syntax in ACCEPTED_TRANSFER_SYNTAXES:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(MRImageStorage, [syntax])
        assoc = ae.associate(HOST, listener.port, ae_title="PARASPINAL")
        try:
            assert assoc.is_established and [c.transfer_syntax[0] for c in assoc.accepted_contexts] == [syntax]
        finally:
            assoc.release()
    assert {JPEGBaseline8Bit, JPEGLossless, JPEGLSNearLossless, JPEG2000} <= set(ACCEPTED_TRANSFER_SYNTAXES)


def _mr_dataset(study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.PatientName, ds.PatientID = "MR", "TEST^UID", "UIDTEST"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _store_one(port: int) -> tuple[int, str]:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    study = generate_uid()
    assoc = ae.associate(HOST, port, ae_title="PARASPINAL")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(_mr_dataset(study, generate_uid(), generate_uid()))
    finally:
        assoc.release()
    return int(rsp.Status), study


def test_write_failure_answers_out_of_resources_and_leaves_no_file(listener, monkeypatch):
    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module.os, "fsync", failing_fsync)
    status, _ = _store_one(listener.port)
    monkeypatch.undo()
    assert status == 0xA700
    assert [p for p in listener.spool.root.rglob("*") if p.is_file()] == []  # no instance, no temp file


def test_accepted_sockets_have_nagle_off(listener):
    """The C-STORE response is a small write that must not wait for the peer's delayed ACK."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(HOST, listener.port, ae_title="PARASPINAL")
    try:
        assert assoc.is_established
        deadline = time.time() + 5
        while not listener._server.active_associations and time.time() < deadline:
            time.sleep(0.01)
        (server_side,) = listener._server.active_associations
        sock = server_side.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    deadline = time.time() + 5
    while listener._server.active_associations and time.time() < deadline:
        time.sleep(0.01)
    assert not listener._server.active_associations  # released: both threads ended


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("study_uid", ["../../escape", "1.2.3/../../x", "1." + "9" * 70, ""])
def test_invalid_uid_gets_failure_status_and_no_file(listener, tmp_path, study_uid):
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, listener.port, ae_title="PARASPINAL")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(_mr_dataset(study_uid, generate_uid(), generate_uid()))
    finally:
        assoc.release()
    assert rsp.Status == 0xC000
    spool_root = listener.spool.root
    assert list(spool_root.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool", "state.sqlite3", "state.sqlite3-shm",
                                                          "state.sqlite3-wal"]


def test_low_disk_refuses_with_out_of_resources(tmp_path):
    settings = _settings(tmp_path, min_free_disk_mb=10 ** 12)  # more than any disk has
    state = StateStore(settings.state_db)
    node = Listener(settings, Spool(settings.spool_dir), state)
    node.start()
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(HOST, node.port, ae_title="PARASPINAL")
        rsp = assoc.send_c_store(_mr_dataset(generate_uid(), generate_uid(), generate_uid()))
        assoc.release()
        assert rsp.Status == 0xA700
        assert list(node.spool.root.iterdir()) == []
    finally:
        node.stop()
        state.close()


@needs_dcmtk
def test_two_scus_at_once_are_both_spooled(listener, tmp_path):
    studies = [make_synthetic_study(tmp_path / name, seed=seed, rows=64, cols=64, pixel_spacing=(4.0, 4.0),
                                    n_slices=3) for name, seed in (("a", 11), ("b", 12))]
    runs = [subprocess.Popen(["storescu", "-aet", ae, "-aec", "PARASPINAL", HOST, str(listener.port),
                              "+sd", "+r", str(study.root)], stderr=subprocess.PIPE, text=True)
            for ae, study in zip(("SCU_A", "SCU_B"), studies)]
    for run in runs:
        _, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
    for study in studies:
        assert listener.state.study(study.study_uid)["instances"] == len(study.all_paths)
        assert len(list(listener.spool.study_dir(study.study_uid).glob("*/*.dcm"))) == len(study.all_paths)


# ---- sender with DCMTK storescp ------------------------------------------------------------


@needs_dcmtk
def test_sender_delivers_to_storescp_and_dead_letters_an_unreachable_peer(tmp_path, small_study):
    pacs = start_storescp(tmp_path / "pacs", ae_title="PACS")
    try:
        closed_port = free_tcp_port()  # nothing listens there
        settings = _settings(tmp_path, send_retries=1, send_backoff_s=0.01, send_backoff_max_s=0.02,
                             destinations=(PeerAddress("PACS", HOST, pacs.port),
                                           PeerAddress("GONE", HOST, closed_port)))
        state = StateStore(settings.state_db)
        files = small_study.t2_paths[:2]
        objects = [(p, MRImageStorage, str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
                   for p in files]
        state.enqueue_outputs(small_study.study_uid, objects,
                              [destination_key(d.ae_title, d.host, d.port) for d in settings.destinations])
        sender = Sender(settings, state)
        deadline = time.monotonic() + 30
        while state.summary()["outbox"]["pending"] and time.monotonic() < deadline:
            sender.send_due()
            time.sleep(0.03)
        rows = state.outbox_rows(small_study.study_uid)
        assert {(r["destination"].split("@")[0], r["status"]) for r in rows} == {("PACS", "sent"), ("GONE", "dead")}
        assert all(r["attempts"] == 2 for r in rows if r["status"] == "dead")  # first try + 1 retry
        received = list((tmp_path / "pacs" / "received").glob("*.dcm"))
        assert sorted(pydicom.dcmread(p).SOPInstanceUID for p in received) == sorted(o[2] for o in objects)
        state.close()
    finally:
        pacs.stop()


def _muscle_seg_copy(level_seg_path: Path, out: Path) -> Path:
    """The level SEG turned into a SEG without vertebra/disc segments (as this node's own muscle
    SEG is): same study, new series and instance UIDs, segments coded as multifidus."""
    ds = pydicom.dcmread(level_seg_path)
    ds.SeriesInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for segment in ds.SegmentSequence:
        segment.SegmentLabel = "multifidus right"
        code = segment.SegmentedPropertyTypeCodeSequence[0]
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "5709001", "SCT", "Multifidus muscles"
        if "AnatomicRegionSequence" in segment:
            del segment.AnatomicRegionSequence
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.skipif(not tool_available("storescu"), reason="DCMTK storescu not installed")
def test_a_level_seg_is_accepted_and_reanalyses_but_a_routed_back_muscle_seg_never_does(listener, tmp_path):
    """A PACS may send the study's spine-label SEG (the lumbar level source) before or after the
    images, and may route the node's own muscle SEG back: both are stored (acknowledged means on
    disk), only the level source sends an analysed study back for another analysis (no loop)."""
    study = make_synthetic_study(tmp_path / "study", seed=5, rows=64, cols=64, n_slices=6,
                                 include_distractors=False, level_seg=True)
    level_seg = study.level_segs[0].seg_path
    own_like = _muscle_seg_copy(level_seg, tmp_path / "muscle_seg.dcm")
    state = listener.state

    def send(*paths: Path) -> None:
        # -R: propose only the files' own SOP classes (storescu's default list lacks Segmentation)
        run = subprocess.run(["storescu", "-R", "-aet", "STORESCU", "-aec", "PARASPINAL", HOST, str(listener.port),
                              *map(str, paths)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr

    send(*study.stacks[0].paths)
    state.mark_ready(0.0, now=time.time() + 1)
    claim = state.claim_next()
    state.finish(claim, True, "done", "ok")
    assert state.study(study.study_uid)["status"] == "done"

    send(own_like)
    assert len(list(listener.spool.root.rglob("*.dcm"))) == len(study.stacks[0].paths) + 1
    assert state.study(study.study_uid)["status"] == "done"  # kept, not analysed again

    send(level_seg)
    assert len(list(listener.spool.root.rglob("*.dcm"))) == len(study.stacks[0].paths) + 2
    assert state.study(study.study_uid)["status"] == "receiving"  # analysed again, now with levels


# ---- retention -----------------------------------------------------------------------------

DAY = 86400.0


def _finished_study(state: StateStore, spool: Spool, settings, study: str, finished_at: float,
                    outbox_status: str | None = "sent") -> None:
    """A study with one spooled instance, analysed (done) at ``finished_at``, with a results
    folder and, unless ``outbox_status`` is None, one output in that outbox state."""
    spool.store(study, study + ".1", study + ".1.1", b"x" * 10)
    state.record_instance(_arrival(study, study + ".1.1", series=study + ".1"), now=finished_at - 60)
    state.mark_ready(1.0, now=finished_at - 30)
    claim = state.claim_next(now=finished_at - 30)
    results = Path(settings.results_dir) / study
    results.mkdir(parents=True)
    (results / "sr.dcm").write_bytes(b"sr")
    outputs = [(results / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34", study + ".9")] if outbox_status else []
    state.finish(claim, True, "done", "ok", results_path=str(results), outputs=outputs,
                 destinations=["PACS@127.0.0.1:104"] if outputs else [], now=finished_at)
    if outbox_status and outbox_status != "pending":
        with state._tx() as db:
            db.execute("UPDATE outbox SET status=? WHERE study_uid=?", (outbox_status, study))


def test_retention_forgets_finished_delivered_studies_and_keeps_what_is_still_needed(tmp_path):
    from app.node.audit import AuditLog, read_audit
    from app.node.retention import purge_expired

    settings = _settings(tmp_path, retention_days=14.0,
                         destinations=(PeerAddress("PACS", "127.0.0.1", 104),))
    state, spool = StateStore(settings.state_db), Spool(settings.spool_dir)
    audit = AuditLog(tmp_path / "audit.jsonl")
    now = 100 * DAY
    _finished_study(state, spool, settings, "1.1", finished_at=now - 15 * DAY)                 # expired, delivered
    _finished_study(state, spool, settings, "1.2", finished_at=now - 13 * DAY)                 # too recent
    _finished_study(state, spool, settings, "1.3", finished_at=now - 30 * DAY, outbox_status="dead")
    _finished_study(state, spool, settings, "1.4", finished_at=now - 30 * DAY, outbox_status="pending")

    assert purge_expired(settings, state, spool, audit, now=now) == ["1.1"]
    assert state.study("1.1") is None and state.outbox_rows("1.1") == []
    assert not spool.study_dir("1.1").exists() and not (Path(settings.results_dir) / "1.1").exists()
    for kept in ("1.2", "1.3", "1.4"):  # recent, dead letter (operator's call), still to send
        assert state.study(kept)["status"] == "done" and spool.study_dir(kept).is_dir()
    assert not list(Path(settings.spool_dir).glob(".purge-*"))
    (line,) = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "study_purged"]
    assert line["study"] != "1.1" and line["status"] == "done"  # hashed, never the UID itself

    # The same study arriving again later is a new study, analysed from what arrives.
    spool.store("1.1", "1.1.1", "1.1.1.1", b"x" * 10)
    assert state.record_instance(_arrival("1.1", "1.1.1.1", "new", series="1.1.1"), now=now + 1) == "receiving"
    assert state.study("1.1")["instances"] == 1
    audit.close()
    state.close()


def test_retention_removes_refused_corrections_past_retention_and_keeps_recent_ones(tmp_path):
    import os

    from app.node.audit import AuditLog, read_audit
    from app.node.retention import purge_refused_corrections

    refused = tmp_path / "refused"
    now = 100 * DAY
    for name, age_days in (("old", 15), ("recent", 13)):
        folder = refused / name
        folder.mkdir(parents=True)
        (folder / "seg.dcm").write_bytes(b"DICM")
        os.utime(folder, (now - age_days * DAY, now - age_days * DAY))
    audit = AuditLog(tmp_path / "audit.jsonl")
    assert purge_refused_corrections(refused, 0.0, audit, now=now) == []  # 0: keep everything
    assert purge_refused_corrections(refused, 14.0, audit, now=now) == ["old"]
    assert sorted(p.name for p in refused.iterdir()) == ["recent"]
    audit.close()
    assert [e["seg"] for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "refused_correction_purged"] == ["old"]


def test_retention_keeps_results_without_destinations_and_zero_keeps_everything(tmp_path):
    from app.node.retention import purge_expired

    settings = _settings(tmp_path, retention_days=1.0, destinations=())
    state, spool = StateStore(settings.state_db), Spool(settings.spool_dir)
    now = 100 * DAY
    _finished_study(state, spool, settings, "2.1", finished_at=now - 2 * DAY, outbox_status=None)
    _finished_study(state, spool, settings, "2.2", finished_at=now - 2 * DAY, outbox_status=None)
    assert purge_expired(dataclasses.replace(settings, retention_days=0.0), state, spool, now=now) == []
    assert state.study("2.1") is not None
    assert purge_expired(settings, state, spool, now=now) == ["2.1", "2.2"]
    assert not spool.study_dir("2.1").exists()
    assert (Path(settings.results_dir) / "2.1" / "sr.dcm").is_file()  # the only copy of the results
    state.close()


def test_retention_never_removes_an_instance_being_stored(tmp_path):
    """While the listener holds the study's lock (file written, not yet recorded), the purge
    waits; once the arrival is recorded the study is no longer expired and is kept."""
    from app.node.retention import purge_expired

    settings = _settings(tmp_path, retention_days=1.0, destinations=(PeerAddress("PACS", "127.0.0.1", 104),))
    state, spool = StateStore(settings.state_db), Spool(settings.spool_dir)
    now = 100 * DAY
    _finished_study(state, spool, settings, "3.1", finished_at=now - 2 * DAY)
    expired = state.expired_studies(now - DAY)
    assert [s["study_uid"] for s in expired] == ["3.1"]
    lock = spool.study_lock("3.1")
    lock.acquire()
    result: list = []
    sweep = threading.Thread(target=lambda: result.append(purge_expired(settings, state, spool, now=now)))
    sweep.start()
    time.sleep(0.3)
    assert sweep.is_alive() and spool.study_dir("3.1").is_dir()  # waiting for the lock
    spool.store("3.1", "3.1.1", "3.1.1.2", b"y" * 10)
    state.record_instance(_arrival("3.1", "3.1.1.2", series="3.1.1"), now=now)
    lock.release()
    sweep.join(timeout=10)
    assert result == [[]]
    assert state.study("3.1")["status"] == "receiving" and state.study("3.1")["instances"] == 2
    assert spool.instance_path("3.1", "3.1.1", "3.1.1.2").is_file()
    state.close()
