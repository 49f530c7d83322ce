"""The node end to end with real peers: DCMTK storescu/storescp, Orthanc auto-routing, dciodvfy.

One node (``python -m app serve``, one worker, 2 s quiet period) serves the whole module; it
sends every result to two destinations: DCMTK ``storescp`` ("PACS") and Orthanc. Orthanc
routes each stable MR series to the node with a Lua ``OnStableSeries`` script. All peers run
on free loopback ports and are stopped at the end of the module.

The model is the bundle in ``models/`` (``models/paraspinal_t2ax`` once trained), or the one
named by ``PARASPINAL_TEST_MODEL``; without one the module is skipped, saying so.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from app.config import DEFAULT_MODEL_PATH, PROJECT_ROOT
from app.node.net import echo, free_tcp_port
from app.node.sender import store_files
from app.node.state import StateStore
from paraspinal.model_bundle import BundleError, find_bundle
from paraspinal.synthetic_study import make_synthetic_study
from tests.peers import HOST, received_by_sop_class, start_node, start_orthanc, start_storescp, tool_available

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY_TIMEOUT_S = 240.0


def _model_path() -> Path | None:
    candidates = [os.environ.get("PARASPINAL_TEST_MODEL"), DEFAULT_MODEL_PATH / "paraspinal_t2ax", DEFAULT_MODEL_PATH]
    for candidate in filter(None, candidates):
        try:
            return find_bundle(Path(candidate))
        except BundleError:
            continue
    return None


MODEL = _model_path()
pytestmark = [
    pytest.mark.skipif(MODEL is None, reason="no model bundle in models/ (nor PARASPINAL_TEST_MODEL) yet"),
    pytest.mark.skipif(not (tool_available("storescp") and tool_available("Orthanc") and tool_available("dciodvfy")),
                       reason="DCMTK, Orthanc and dciodvfy are needed"),
]


def _study(root: Path, seed: int, distractors: bool = True, level_seg: bool = False):
    """A small lumbar study: axial T2 (8 slices, 2 mm pixels) plus, by default, localizer,
    sagittal T2 and axial T1 distractors; with ``level_seg`` also a labelled spine SEG (the
    lumbar level source) over a sagittal series."""
    return make_synthetic_study(root, seed=seed, rows=128, cols=128, pixel_spacing=(1.875, 1.875), n_slices=8,
                                include_distractors=distractors, level_seg=level_seg)


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    root = tmp_path_factory.mktemp("node_e2e")
    started = []
    try:
        pacs = start_storescp(root / "pacs", ae_title="PACS")
        started.append(pacs)
        node_port = free_tcp_port()
        orthanc = start_orthanc(root / "orthanc", node_ae="PARASPINAL", node_port=node_port)
        started.append(orthanc)
        node = start_node(
            root / "node", MODEL, port=node_port, quiet_period_s=2.0, workers=1,
            allowed_peers=[{"ae_title": ae, "host": HOST} for ae in ("ECHOSCU", "STORESCU", "SCU_A", "SCU_B",
                                                                      "ORTHANC")],
            destinations=[{"ae_title": "PACS", "host": HOST, "port": pacs.port},
                          {"ae_title": "ORTHANC", "host": HOST, "port": orthanc.port}])
        started.append(node)
        yield {"pacs": pacs, "orthanc": orthanc, "node": node, "root": root}
    finally:
        for peer in reversed(started):
            peer.stop()


def _wait_delivered(node, study_uid: str, destinations: int = 2, timeout_s: float = STUDY_TIMEOUT_S) -> dict:
    """Until the study is done and every output (SEG, SR and whatever else the pipeline writes)
    is sent to every destination; returns the study row."""
    deadline = time.monotonic() + timeout_s
    study: dict | None = None
    while time.monotonic() < deadline:
        assert node.alive(), node.log_text()[-3000:]
        state = StateStore(node.workdir / "state.sqlite3", readonly=True)
        try:
            study = state.study(study_uid)
            rows = state.outbox_rows(study_uid)
        finally:
            state.close()
        if study and study["status"] == "failed":
            pytest.fail(f"study failed: {study['reason']}")
        current = [r for r in rows if r["status"] != "superseded"]
        if study and study["status"] == "done" and current and all(r["status"] == "sent" for r in current):
            assert len(current) % destinations == 0
            return study
        time.sleep(0.5)
    pytest.fail(f"study {study_uid} not delivered in {timeout_s} s: {study}\n{node.log_text()[-3000:]}")


def echo_ok(node) -> bool:
    return echo(HOST, node.port, node.ae_title, calling_ae="ECHOSCU") == 0


def _received(pacs, study_uid: str) -> dict[str, list[Path]]:
    """storescp's files of one study, by SOP Class UID."""
    return received_by_sop_class(pacs.workdir, study_uid)


def test_storescu_study_comes_back_to_storescp_as_valid_seg_and_sr(peers, tmp_path):
    """The whole study over C-STORE, its spine-label SEG included (storescu -R proposes the
    files' own SOP classes, Segmentation among them): valid SEG and SR come back, the SR with
    measurements per lumbar level."""
    study = _study(tmp_path / "study", seed=21, level_seg=True)
    run = subprocess.run(["storescu", "-R", "-aet", "STORESCU", "-aec", "PARASPINAL", HOST, str(peers["node"].port),
                          "+sd", "+r", str(study.root)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    row = _wait_delivered(peers["node"], study.study_uid)
    assert row["outcome"] == "done" and row["instances"] == len(study.all_paths)
    received = _received(peers["pacs"], study.study_uid)
    assert {SEG_STORAGE, COMPREHENSIVE_3D_SR} <= set(received), received
    for path in [p for paths in received.values() for p in paths]:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], (path.name, errors)
    seg = pydicom.dcmread(received[SEG_STORAGE][0], stop_before_pixels=True)
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert referenced == {study.t2_series_uid}  # the axial T2, not a distractor
    # Two SRs come back: the complete report and the outlines-only one for viewers (sr_viewer.dcm).
    reports = [hd.sr.srread(path).content for path in received[COMPREHENSIVE_3D_SR]]
    (complete,) = [r for r in reports if r.get_volumetric_roi_measurement_groups()]
    (outlines,) = [r for r in reports if not r.get_volumetric_roi_measurement_groups()]
    assert all(g.roi is not None for g in outlines.get_planar_roi_measurement_groups())
    groups = complete.get_volumetric_roi_measurement_groups()
    level_groups = [str(g.tracking_identifier) for g in groups if " level " in str(g.tracking_identifier)]
    assert level_groups, [str(g.tracking_identifier) for g in groups]

    status = subprocess.run([sys.executable, "-m", "app", "--config", str(peers["node"].workdir / "node.yaml"),
                             "status"], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert status.returncode == 0, status.stderr
    assert ": running" in status.stdout and study.study_uid in status.stdout


def test_orthanc_routes_the_study_to_the_node_and_receives_the_results(peers, tmp_path):
    orthanc = peers["orthanc"]
    study = _study(tmp_path / "study", seed=22)
    for path in study.all_paths:
        orthanc.rest("POST", "/instances", path.read_bytes())
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    modalities: dict[str, str] = {}
    while time.monotonic() < deadline:
        modalities = {s["MainDicomTags"].get("Modality", ""): s["ID"] for s in orthanc.find_series(study.study_uid)}
        if {"SEG", "SR"} <= set(modalities):
            break
        assert peers["node"].alive() and orthanc.alive()
        time.sleep(1.0)
    assert {"SEG", "SR"} <= set(modalities), (modalities, orthanc.log_text()[-2000:])
    for modality in ("SEG", "SR"):
        series = orthanc.rest("GET", f"/series/{modalities[modality]}")
        instance = orthanc.rest("GET", f"/instances/{series['Instances'][0]}/simplified-tags")
        assert instance["StudyInstanceUID"] == study.study_uid
        assert instance["SOPClassUID"] == (SEG_STORAGE if modality == "SEG" else COMPREHENSIVE_3D_SR)
    # Orthanc routes SEG series too (the level source): the node's own SEG comes back. It is
    # stored, but the study is not analysed again and nothing more is sent: no loop.
    node_study = _wait_delivered(peers["node"], study.study_uid)
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    while node_study["instances"] < len(study.all_paths) + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        node_study = _wait_delivered(peers["node"], study.study_uid)
    assert node_study["instances"] == len(study.all_paths) + 1, orthanc.log_text()[-2000:]
    time.sleep(4.0)  # longer than the node's quiet period (2 s): a counted arrival would have queued it
    state = StateStore(peers["node"].workdir / "state.sqlite3", readonly=True)
    try:
        after, rows = state.study(study.study_uid), state.outbox_rows(study.study_uid)
    finally:
        state.close()
    assert after["status"] == "done" and after["attempts"] == 1, after
    assert all(r["status"] == "sent" for r in rows) and len(rows) == len({(r["sop_instance_uid"], r["destination"])
                                                                          for r in rows})


def test_two_studies_sent_at_once_both_complete(peers, tmp_path):
    studies = [_study(tmp_path / name, seed=seed, distractors=False) for name, seed in (("a", 31), ("b", 32))]
    outcomes: dict[str, list] = {}

    def send(ae: str, study) -> None:
        outcomes[ae] = store_files(study.all_paths, ae, "PARASPINAL", HOST, peers["node"].port)

    threads = [threading.Thread(target=send, args=(ae, s)) for ae, s in zip(("SCU_A", "SCU_B"), studies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(status == 0 for results in outcomes.values() for _, status, _ in results), outcomes
    for study in studies:
        _wait_delivered(peers["node"], study.study_uid)
        assert {SEG_STORAGE, COMPREHENSIVE_3D_SR} <= set(_received(peers["pacs"], study.study_uid))


def test_a_failing_study_is_kept_with_its_reason_and_the_node_goes_on(peers, tmp_path):
    """Truncated pixel data in the axial T2: the analysis fails, the study is kept under
    failed_dir with its reason, nothing is sent, and the node keeps serving."""
    study = _study(tmp_path / "study", seed=51, distractors=False)
    for path in study.t2_paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        ds.save_as(path)
    node = peers["node"]
    assert all(s == 0 for _, s, _ in store_files(study.all_paths, "SCU_A", "PARASPINAL", HOST, node.port))
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    row: dict | None = None
    while time.monotonic() < deadline and not (row and row["status"] == "failed"):
        time.sleep(0.5)
        state = StateStore(node.workdir / "state.sqlite3", readonly=True)
        row = state.study(study.study_uid)
        outbox = state.outbox_rows(study.study_uid)
        state.close()
    assert row and row["status"] == "failed", row
    assert outbox == []
    kept = node.workdir / "failed" / study.study_uid
    assert (kept / "reason.txt").read_text().strip() == row["reason"] != ""
    assert len(list((kept / "instances").glob("*/*.dcm"))) == len(study.all_paths)
    status = subprocess.run([sys.executable, "-m", "app", "--config", str(node.workdir / "node.yaml"), "status"],
                            capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert "failed 1" in status.stdout
    assert echo_ok(node)


def test_a_worker_process_that_dies_fails_only_its_study(peers, tmp_path):
    """SIGKILL of the worker during an analysis: that study is failed (kept, with the reason),
    the worker pool is restarted with the model loaded again, and the node keeps serving."""
    node = peers["node"]
    study = make_synthetic_study(tmp_path / "study", seed=52)  # full size: the analysis lasts seconds
    assert all(s == 0 for _, s, _ in store_files(study.all_paths, "SCU_B", "PARASPINAL", HOST, node.port))
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    while f"event=analysis_started study={study.study_uid}" not in node.log_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    worker_pid = int(re.findall(r"event=worker_ready pid=(\d+)", node.log_text())[-1])
    os.kill(worker_pid, signal.SIGKILL)
    row: dict | None = None
    while time.monotonic() < deadline and not (row and row["status"] in ("done", "failed")):
        time.sleep(0.5)
        state = StateStore(node.workdir / "state.sqlite3", readonly=True)
        row = state.study(study.study_uid)
        state.close()
    assert row and row["status"] == "failed" and "worker process failed" in row["reason"], row
    assert (node.workdir / "failed" / study.study_uid / "reason.txt").is_file()
    while len(re.findall(r"event=worker_ready pid=(\d+)", node.log_text())) < 2:
        assert time.monotonic() < deadline and node.alive()
        time.sleep(0.2)
    assert "event=worker_pool_broken" in node.log_text() and echo_ok(node)


def test_node_log_is_structured_and_free_of_patient_identity(peers):
    text = peers["node"].log_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert any("event=instance_stored" in line for line in lines)
    assert any("event=analysis_done" in line for line in lines)
    assert any("event=result_sent" in line for line in lines)
    # The synthetic patients are PHANTOM^LUMBAR<seed>, IDs PHANTOM<seed>, born 19700101.
    for identity in ("PHANTOM", "19700101"):
        assert identity not in text


def test_restart_sends_results_that_could_not_be_delivered(tmp_path):
    """The PACS is down while the study is analysed; the node stops with its results unsent,
    restarts later with the PACS up, and delivers them from the outbox in its database."""
    pacs_port = free_tcp_port()
    settings = dict(quiet_period_s=1.0, send_retries=100, send_backoff_s=0.5, send_backoff_max_s=1.0,
                    destinations=[{"ae_title": "LATEPACS", "host": HOST, "port": pacs_port}])
    study = _study(tmp_path / "study", seed=41, distractors=False)
    node = start_node(tmp_path / "node", MODEL, **settings)
    try:
        assert all(s == 0 for _, s, _ in store_files(study.all_paths, "SCU", "PARASPINAL", HOST, node.port))
        deadline = time.monotonic() + STUDY_TIMEOUT_S
        rows: list[dict] = []
        while time.monotonic() < deadline and not (rows and all(r["attempts"] >= 1 for r in rows)):
            time.sleep(0.5)
            state = StateStore(node.workdir / "state.sqlite3", readonly=True)
            rows = state.outbox_rows(study.study_uid)
            state.close()
        assert rows and all(r["status"] == "pending" and r["attempts"] >= 1 for r in rows), rows
    finally:
        node.stop()
    pacs = start_storescp(tmp_path / "pacs", ae_title="LATEPACS", port=pacs_port)
    node = start_node(tmp_path / "node", MODEL, **settings)
    try:
        _wait_delivered(node, study.study_uid, destinations=1)
        assert {SEG_STORAGE, COMPREHENSIVE_3D_SR} <= set(_received(pacs, study.study_uid))
        assert "event=node_resumed" in node.log_text()
    finally:
        node.stop()
        pacs.stop()
