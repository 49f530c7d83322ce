"""Fuzzing in ``make test``: a few hundred mutated and malformed DICOM cases, derandomised (the
same cases every run), through the receive, spool, index, selection and loading path in
process, and a subset over DICOM to a running listener. ``python -m reliability.fuzz --cases
10000`` runs the same properties at length with fresh randomness (``make soak`` does).
"""

from __future__ import annotations

import logging
import warnings

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from reliability import fuzz

IN_PROCESS_CASES = 300
WIRE_CASES = 50


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fuzz.build_corpus(tmp_path_factory.mktemp("fuzz_corpus"))


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("paraspinal").level
        logging.getLogger("paraspinal").setLevel(logging.CRITICAL)
        yield
        logging.getLogger("paraspinal").setLevel(level)


def test_in_process_receive_spool_index_select_load(corpus, tmp_path):
    stats = fuzz.run_in_process(tmp_path, corpus, IN_PROCESS_CASES, derandomize=True)
    print("\n" + fuzz.format_stats(stats, 0))
    assert stats.failures == []
    assert not stats.escaped and not stats.loader_findings  # nothing past the pipeline's handling; index never raised
    assert stats.total >= IN_PROCESS_CASES
    assert stats.accepted > 0 and sum(stats.refused.values()) > 0  # both sides of the check were exercised


def test_over_the_wire_every_case_is_answered_as_the_check_predicts_and_the_listener_survives(corpus, tmp_path):
    stats = fuzz.Stats()
    fuzz.run_wire_in_process_listener(tmp_path, corpus, WIRE_CASES, seed_value=7, stats=stats)
    print("\n" + fuzz.format_stats(stats, 0))
    assert stats.failures == []
    assert stats.cases["wire"] == WIRE_CASES and "none" not in stats.wire


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(uids=st.tuples(fuzz.crafted_uid(), fuzz.crafted_uid(), fuzz.crafted_uid()))
def test_crafted_uids_never_leave_the_spool(tmp_path_factory, uids):
    from app.node.spool import InvalidUID, Spool

    fence = tmp_path_factory.mktemp("fence")
    spool = Spool(fence / "spool")
    try:
        stored = spool.store(*uids, b"x")
    except InvalidUID:
        assert [p for p in fence.rglob("*") if p.is_file()] == []
        return
    assert stored.path.resolve().is_relative_to(spool.root.resolve())
    assert [p for p in fence.rglob("*") if p.is_file()] == [stored.path]


def test_crafted_uids_over_the_wire_get_cannot_understand_and_write_nothing(corpus, tmp_path):
    """Study/Series/SOP Instance UIDs like ../../etc/passwd, /etc/passwd, with NUL or newline,
    or 70 digits long, sent as a peer would: 0xC000 each, nothing written anywhere."""
    import dataclasses
    import io

    import pydicom
    from pydicom.filebase import DicomBytesIO

    from app.config import load_config
    from app.node.listener import Listener
    from app.node.spool import Spool
    from app.node.state import StateStore

    seed = next(s for s in corpus if s.transfer_syntax == "1.2.840.10008.1.2.1")
    bad = ["../../../../etc/passwd", "/etc/passwd", "1.2/../../x", "1.2.3\n4", "1.2\x00.3", "1." + "2" * 69, "..",
           "1.2.3/", "C:\\x", "1.2.3 4"]
    cases = []
    for i, value in enumerate(bad):
        ds = pydicom.filereader.read_dataset(io.BytesIO(seed.dataset), False, True)
        keyword = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")[i % 3]
        ds[keyword].value = value
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        pydicom.filewriter.write_dataset(buffer, ds)
        cases.append(fuzz.Case(seed, buffer.getvalue(), [f"{keyword}={value!r}"]))
    fence = tmp_path / "fence"
    settings_ = dataclasses.replace(load_config(environ={}).node, port=0, bind_address="127.0.0.1",
                                    spool_dir=fence / "spool", state_db=tmp_path / "state.sqlite3", audit_log=None,
                                    min_free_disk_mb=1)
    state = StateStore(settings_.state_db)
    listener = Listener(settings_, Spool(settings_.spool_dir), state)
    listener.start()
    try:
        statuses = fuzz.send_raw_cases(listener.port, cases, tmp_path)
    finally:
        listener.stop()
        state.close()
    assert statuses == [0xC000] * len(bad)
    assert [p for p in fence.rglob("*") if p.is_file()] == []
    assert {p.name for p in tmp_path.iterdir()} <= {"fence", "state.sqlite3", "state.sqlite3-shm",
                                                    "state.sqlite3-wal"}
    assert [p for p in tmp_path.parent.iterdir() if p.name in ("etc", "passwd", "x")] == []
