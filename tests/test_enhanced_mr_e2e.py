"""Multi-frame MR end to end: over the network to the node (DCMTK storescu in, storescp as the
PACS), and in batch (``python -m app run``) on a study that mixes classic and enhanced series.

The studies are the real MyoSegmenTUM tum01 case (tests/enhanced_mr_studies.py): true Enhanced MR
(two stacks at different angles in one instance, Dixon water and fat frames in one instance), and
a Legacy Converted Enhanced MR T2-like series beside classic Dixon series. The model is the bundle
in ``models/`` (or ``PARASPINAL_TEST_MODEL``); segmentation quality is not tested here, the
handling of the frames and the references to them is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from app.config import PROJECT_ROOT
from app.node.net import echo
from app.node.state import StateStore
from dicom_validators import dciodvfy_errors
from enhanced_mr_studies import legacy_converted, write_real_enhanced_study
from paraspinal.enhanced_mr import ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE
from tests.peers import HOST, start_node, start_storescp, tool_available
from tests.test_node_e2e import MODEL, _received, _wait_delivered

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY_TIMEOUT_S = 600.0

pytestmark = [
    pytest.mark.skipif(MODEL is None, reason="no model bundle in models/ (nor PARASPINAL_TEST_MODEL) yet"),
    pytest.mark.skipif(not (tool_available("storescu") and tool_available("storescp") and tool_available("dciodvfy")),
                       reason="DCMTK and dciodvfy are needed"),
]


def _seg_source_frames(path: Path) -> tuple[set[str], set[int]]:
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    uids, frames = set(), set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for source in frame.DerivationImageSequence[0].SourceImageSequence:
            uids.add(str(source.ReferencedSOPInstanceUID))
            frames.add(int(source.ReferencedFrameNumber))
    return uids, frames


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("enhanced_node")
    started = []
    try:
        pacs = start_storescp(root / "pacs", ae_title="PACS")
        started.append(pacs)
        node = start_node(root / "node", MODEL, quiet_period_s=2.0, workers=1,
                          allowed_peers=[{"ae_title": ae, "host": HOST} for ae in ("ECHOSCU", "STORESCU")],
                          destinations=[{"ae_title": "PACS", "host": HOST, "port": pacs.port}])
        started.append(node)
        yield {"pacs": pacs, "node": node}
    finally:
        for peer in reversed(started):
            peer.stop()


def _storescu(folder: Path, port: int) -> None:
    run = subprocess.run(["storescu", "-R", "-aet", "STORESCU", "-aec", "PARASPINAL", HOST, str(port), "+sd", "+r",
                          str(folder)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_bad_functional_groups_get_a_reason_and_the_node_then_analyses_a_true_enhanced_study(node, tmp_path,
                                                                                              real_data):
    # 1. A Legacy Converted series whose frame 3 lacks its Plane Position: stored, not analysed, and
    #    the series' reason names the attribute and the functional group.
    from paraspinal.nifti_to_dicom import real_case_series

    classic = real_case_series("myosegmentum_tum01", tmp_path / "classic", data_dir=real_data)
    broken = legacy_converted([pydicom.dcmread(p) for p in classic.paths])
    del broken.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    (tmp_path / "broken").mkdir()
    broken.save_as(tmp_path / "broken" / "mf.dcm", enforce_file_format=True)
    peer = node["node"]
    _storescu(tmp_path / "broken", peer.port)
    study_uid = str(broken.StudyInstanceUID)
    deadline, row = time.monotonic() + STUDY_TIMEOUT_S, None
    while time.monotonic() < deadline and not (row and row["status"] in ("done", "failed")):
        time.sleep(0.5)
        state = StateStore(peer.workdir / "state.sqlite3", readonly=True)
        row = state.study(study_uid)
        state.close()
    assert row and row["status"] == "done" and row["outcome"] == "no_suitable_series", row
    result = json.loads((peer.workdir / "results" / study_uid / "result.json").read_text())
    (decision,) = result["series_decisions"]
    assert "frame 3" in decision["reason"] and "ImagePositionPatient" in decision["reason"] \
        and "PlanePositionSequence" in decision["reason"], decision
    assert echo(HOST, peer.port, peer.ae_title, calling_ae="ECHOSCU") == 0

    # 2. The true Enhanced MR study: analysed, one SEG per stack referencing its frames, a valid SR.
    written = write_real_enhanced_study(real_data, tmp_path / "enhanced")
    _storescu(written.folder, peer.port)
    t2 = pydicom.dcmread(written.t2_path, stop_before_pixels=True)
    assert t2.SOPClassUID == ENHANCED_MR_IMAGE_STORAGE
    _wait_delivered(peer, str(t2.StudyInstanceUID), destinations=1, timeout_s=STUDY_TIMEOUT_S)
    received = _received(node["pacs"], str(t2.StudyInstanceUID))
    # two SEGs (one per stack); two SRs: the complete report and the outlines-only viewer SR
    assert len(received.get(SEG_STORAGE, [])) == 2 and len(received.get(COMPREHENSIVE_3D_SR, [])) == 2, received
    seg_frames = []
    for path in received[SEG_STORAGE]:
        assert dciodvfy_errors(path) == [], path.name
        uids, frames = _seg_source_frames(path)
        assert uids == {str(t2.SOPInstanceUID)}
        seg_frames.append(frames)
    stacks = [set(f) for f in written.stack_frames]
    # Each SEG references the frames of one stack only, and the two SEGs cover the two stacks.
    owners = [[i for i, s in enumerate(stacks) if frames <= s] for frames in seg_frames]
    assert sorted(owner for found in owners for owner in found) == [0, 1], (owners, seg_frames)
    for sr_path in received[COMPREHENSIVE_3D_SR]:
        assert dciodvfy_errors(sr_path) == [], sr_path.name
        sr = pydicom.dcmread(sr_path)
        evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
        assert str(t2.SOPInstanceUID) in evidence


def test_batch_run_on_a_study_mixing_a_legacy_converted_t2_and_classic_dixon_series(tmp_path, real_data):
    from tools.validate_fat import write_dixon_study

    written = write_dixon_study(real_data, tmp_path / "study")
    t2_folder = tmp_path / "study" / "03_t2like"
    converted = legacy_converted([pydicom.dcmread(p) for p in sorted(t2_folder.iterdir())])
    for path in t2_folder.iterdir():
        path.unlink()
    converted.save_as(t2_folder / "t2_legacy.dcm", enforce_file_format=True)
    assert converted.SOPClassUID == LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "app", "run", "-i", str(tmp_path / "study"), "-o", str(out),
                          "-m", str(MODEL), "--device", "cpu"], capture_output=True, text=True, timeout=1200,
                         cwd=PROJECT_ROOT, env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    folder = out / written["case"].study_uid
    result = json.loads((folder / "result.json").read_text())
    assert result["status"] == "done", result
    seg_path = folder / "seg_stack1.dcm"
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(folder / "sr.dcm") == []
    uids, frames = _seg_source_frames(seg_path)
    assert uids == {str(converted.SOPInstanceUID)} and frames <= set(range(1, int(converted.NumberOfFrames) + 1))
    measurements = json.loads((folder / "measurements.json").read_text())
    found = [m for s in measurements["stacks"] for m in s["measurements"] if m["found"] and m["muscle"] in
             ("multifidus", "erector spinae")]
    assert found and all(m["pdff_pct"] is not None and m["pdff_erosion_voxels"] == 1 for m in found)
