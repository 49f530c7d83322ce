"""The site teaches the model, over the network: real DCMTK storescu/storescp and the real node.

storescu sends a small synthetic study; the node's SEG reaches storescp; the test edits that
SEG with highdicom as a reader's viewer would and C-STOREs it back. The node stores it as a
site case with the right labels on the right voxels; malformed corrections are refused with
their reasons; the node's own SEG routed back is ignored; a promoted model version is used
for the next study without a restart, and rollback restores the previous one.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from app.__main__ import main as app_main
from app.config import PROJECT_ROOT
from app.node.audit import read_audit
from app.node.logs import uid_hash
from app.node.state import StateStore
from paraspinal.model_bundle import find_bundle, parse_labels, read_metadata
from paraspinal.site_dataset import list_cases
from paraspinal.synthetic_study import make_synthetic_study
from tests.peers import HOST, received_by_sop_class, start_node, start_storescp, tool_available
from tests.seg_editing import description, label_of, node_seg_masks, sorted_series, write_seg

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SHIPPED = find_bundle(PROJECT_ROOT / "models")
LABELS = parse_labels(read_metadata(SHIPPED))
TIMEOUT_S = 240.0

pytestmark = pytest.mark.skipif(not tool_available("storescp"), reason="DCMTK is needed")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("site_e2e")
    started = []
    try:
        pacs = start_storescp(root / "pacs", ae_title="PACS")
        started.append(pacs)
        learning = {"site_dir": str(root / "site"), "refused_dir": str(root / "refused"),
                    "models_dir": str(root / "models"), "site_quota_mb": 50}
        peer = start_node(root / "node", SHIPPED, quiet_period_s=1.0, workers=1,
                          destinations=[{"ae_title": "PACS", "host": HOST, "port": pacs.port}],
                          audit_log=str(root / "audit.jsonl"), sections={"learning": learning})
        started.append(peer)
        yield {"node": peer, "pacs": pacs, "root": root, "site": root / "site", "config": peer.workdir / "node.yaml",
               "audit": root / "audit.jsonl"}
    finally:
        for p in reversed(started):
            p.stop()


def _storescu(node, *paths: Path) -> None:
    run = subprocess.run(["storescu", "-R", "-aet", "STORESCU", "-aec", "PARASPINAL", HOST, str(node.port),
                          "+sd", "+r", *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def _analysed(node, study_uid: str) -> dict:
    """Wait until the study is done and its results are sent; the study row."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert node.alive(), node.log_text()[-3000:]
        state = StateStore(node.workdir / "state.sqlite3", readonly=True)
        try:
            study, rows = state.study(study_uid), state.outbox_rows(study_uid)
        finally:
            state.close()
        if study and study["status"] == "failed":
            pytest.fail(study["reason"])
        if study and study["status"] == "done" and rows and all(r["status"] == "sent" for r in rows):
            return study
        time.sleep(0.5)
    pytest.fail(f"study not delivered: {node.log_text()[-3000:]}")


def _audit_events(path: Path, event: str, count: int, timeout_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    found: list[dict] = []
    while time.monotonic() < deadline:
        found = [e for e in read_audit(path) if e["event"] == event] if path.is_file() else []
        if len(found) >= count:
            return found
        time.sleep(0.3)
    pytest.fail(f"{count} {event} audit entries expected, found {found}")


def _node_seg(pacs, study_uid: str) -> Path:
    segs = received_by_sop_class(pacs.workdir, study_uid).get(SEG_STORAGE, [])
    if not segs:
        pytest.fail("the node's SEG did not reach storescp")
    return segs[0]


@pytest.fixture(scope="module")
def analysed_study(node, tmp_path_factory):
    """One study analysed by the node, its SEG received by storescp."""
    root = tmp_path_factory.mktemp("study")
    study = make_synthetic_study(root / "study", seed=61, rows=128, cols=128, pixel_spacing=(1.875, 1.875),
                                 n_slices=8, include_distractors=False)
    _storescu(node["node"], study.root)
    _analysed(node["node"], study.study_uid)
    stack = study.stacks[0]
    return {"study": study, "stack": stack, "source": sorted_series(stack.paths),
            "node_seg": _node_seg(node["pacs"], study.study_uid), "root": root}


def test_corrected_seg_sent_back_becomes_a_site_case_with_the_right_labels_on_the_right_voxels(node, analysed_study):
    source, stack = analysed_study["source"], analysed_study["stack"]
    masks = node_seg_masks(analysed_study["node_seg"], source)
    # The reader redraws erector spinae right (here: the phantom's truth), keeps the node's
    # multifidus and left erector spinae, and does not touch psoas or quadratus lumborum.
    edited = {"erector spinae right": stack.labels == label_of(LABELS, "erector spinae right").value}
    for name in ("multifidus right", "multifidus left", "erector spinae left"):
        mask = masks.get(name)
        edited[name] = mask if mask is not None and mask.any() else stack.labels == label_of(LABELS, name).value
    names = list(edited)
    # One segment as a viewer's new segment would come: generic "Tissue" code, the name in its label.
    descriptions = [description(i + 1, label_of(LABELS, n), with_codes=(n != "multifidus left"),
                                text="Multifidus L" if n == "multifidus left" else None) for i, n in enumerate(names)]
    seg_path = write_seg(source, [edited[n] for n in names], descriptions, analysed_study["root"] / "corrected.dcm")
    _storescu(node["node"], seg_path)

    (accepted,) = _audit_events(node["audit"], "correction_accepted", 1)
    (case,) = list_cases(node["site"])
    assert accepted["case"] == case.case_id and accepted["label_text_fallbacks"] == 1
    assert case.labelled_classes == (0, 1, 2, 3, 4)  # partial: psoas and quadratus lumborum stay unknown
    node_seg_uid = str(pydicom.dcmread(analysed_study["node_seg"], stop_before_pixels=True).SOPInstanceUID)
    study_uid = analysed_study["study"].study_uid
    assert case.provenance["corrects"] == uid_hash(node_seg_uid)
    assert case.provenance["study_hash"] == uid_hash(study_uid) and case.provenance["calling_ae"] == "STORESCU"
    provenance_text = (case.folder / "provenance.json").read_text()
    assert study_uid not in provenance_text and str(source[0].PatientID) not in provenance_text

    expected = np.zeros(stack.labels.shape, dtype=np.uint8)  # (K, rows, cols) in slice order
    for name in names:
        expected[edited[name]] = label_of(LABELS, name).value
    label = np.asarray(nib.load(str(case.label_path)).dataobj)
    image = np.asarray(nib.load(str(case.image_path)).dataobj)
    # The NIfTI grid is (I, J, K) = (column, row, slice) of the series.
    assert label.shape == (128, 128, 8) and np.array_equal(label, expected.transpose(2, 1, 0))
    assert np.array_equal(image, np.stack([ds.pixel_array for ds in source]).transpose(2, 1, 0).astype(np.float32))
    assert "correction_label_fallback" in node["node"].log_text()


def _variant(source, stack, root: Path, name: str, masks, descriptions, edit=None) -> Path:
    path = write_seg(source, masks, descriptions, root / f"{name}.dcm")
    if edit is not None:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(str(path))
    return path


def test_malformed_corrections_are_refused_with_their_reasons_and_never_trained_on(node, analysed_study):
    source, stack, root = analysed_study["source"], analysed_study["stack"], analysed_study["root"]
    es_r = label_of(LABELS, "erector spinae right")
    truth = stack.labels == es_r.value
    good = [description(1, es_r)]

    def shift(ds):
        for frame in ds.PerFrameFunctionalGroupsSequence:
            position = frame.PlanePositionSequence[0].ImagePositionPatient
            frame.PlanePositionSequence[0].ImagePositionPatient = [float(position[0]) + 3.0, position[1], position[2]]

    def other_series(ds):
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID = hd.UID()

    liver = hd.seg.SegmentDescription(segment_number=2, segment_label="liver",
                                      segmented_property_category=codes.SCT.Organ,
                                      segmented_property_type=codes.SCT.Liver,
                                      algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    variants = {
        "wrong frame of reference": _variant(source, stack, root, "for", [truth], good,
                                             lambda ds: setattr(ds, "FrameOfReferenceUID", hd.UID())),
        "unknown segment": _variant(source, stack, root, "unknown", [truth, truth], [*good, liver]),
        "empty segment": _variant(source, stack, root, "empty", [truth, np.zeros_like(truth)],
                                  [*good, description(2, label_of(LABELS, "multifidus right"))]),
        "mismatched geometry": _variant(source, stack, root, "geometry", [truth], good, shift),
        "does not reference a series the node analysed": _variant(source, stack, root, "series", [truth], good,
                                                                  other_series),
    }
    cases_before = len(list_cases(node["site"]))
    _storescu(node["node"], *variants.values())
    refused = _audit_events(node["audit"], "correction_refused", len(variants))
    by_seg = {e["sop"]: e["reason"] for e in refused}
    for why, path in variants.items():
        sop = uid_hash(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        assert why in by_seg[sop], (why, by_seg[sop])
        kept = json.loads((node["root"] / "refused" / sop / "reason.json").read_text())
        assert why in kept["reason"]
    assert len(list_cases(node["site"])) == cases_before
    assert node["node"].log_text().count("correction_refused") >= len(variants)


def test_the_nodes_own_seg_routed_back_is_ignored(node, analysed_study):
    _storescu(node["node"], analysed_study["node_seg"])
    (ignored,) = _audit_events(node["audit"], "correction_ignored", 1)
    own = str(pydicom.dcmread(analysed_study["node_seg"], stop_before_pixels=True).SOPInstanceUID)
    assert ignored["sop"] == uid_hash(own)
    time.sleep(2.0)  # longer than the quiet period: a counted arrival would have queued the study again
    state = StateStore(node["node"].workdir / "state.sqlite3", readonly=True)
    try:
        study = state.study(analysed_study["study"].study_uid)
    finally:
        state.close()
    assert study["status"] == "done" and study["attempts"] == 1


def test_a_promoted_version_analyses_the_next_study_without_restart_and_rollback_restores(node, analysed_study,
                                                                                        tmp_path, capsys):
    from training.finetune import main as finetune_main

    # A real (tiny) fine-tune on the site case the node stored; one patient: nothing to hold
    # out, so the gate refuses and the operator promotes by force (audited as forced).
    assert finetune_main(["--config", str(node["config"]), "--site", str(node["site"]), "-m", str(SHIPPED),
                          "--real-cases", "--iterations", "2", "--batch-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["decision"] == "refuse" and not summary["promoted"]
    version = summary["version"]
    cli = ["--config", str(node["config"]), "model", "-m", str(SHIPPED)]
    assert app_main([*cli, "promote", version]) == 2  # refused by the gate
    assert app_main([*cli, "promote", version, "--force"]) == 0
    pid = node["node"].process.pid

    study = make_synthetic_study(tmp_path / "study2", seed=62, rows=128, cols=128, pixel_spacing=(1.875, 1.875),
                                 n_slices=8, include_distractors=False)
    _storescu(node["node"], study.root)
    row = _analysed(node["node"], study.study_uid)
    result = json.loads((Path(row["results_path"]) / "result.json").read_text())
    assert result["model"]["version"] == version and node["node"].process.pid == pid
    seg = pydicom.dcmread(_node_seg(node["pacs"], study.study_uid), stop_before_pixels=True)
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == version
    assert "model_switched" in node["node"].log_text()

    assert app_main([*cli, "rollback"]) == 0
    events = [e for e in read_audit(node["audit"]) if e["event"] in ("model_promoted", "model_rolled_back")]
    assert [(e["event"], e["version"]) for e in events] == [("model_promoted", version),
                                                            ("model_rolled_back", read_metadata(SHIPPED)["version"])]
    assert events[0]["forced"] is True
