"""A DICOMweb destination of the node: results go to Orthanc (DICOMweb plugin) by STOW-RS.

Real peers on loopback: the node (``python -m app serve``), Orthanc with
``libOrthancDicomWeb.so`` and HTTP basic auth, ``dicomweb-client`` for the checks. The archive
is down when the study's results are first due; they wait in the outbox (retry with backoff,
audited) and are delivered once it is up.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
import requests

from app.config import DicomwebDestination, ConfigError, load_config
from app.dicomweb import make_client
from app.node.net import free_tcp_port
from app.node.sender import store_files
from app.node.state import StateStore
from paraspinal.synthetic_study import make_synthetic_study
from tests.peers import model_under_test, DICOMWEB_PLUGIN, HOST, start_dicomweb_archive, start_node, tool_available

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
USER, PASSWORD = "node", "s3cret-for-tests"


MODEL = model_under_test()
needs_peers = [
    pytest.mark.skipif(MODEL is None, reason="no model bundle"),
    pytest.mark.skipif(not (tool_available("Orthanc") and DICOMWEB_PLUGIN.is_file()),
                       reason="Orthanc and its DICOMweb plugin (Debian orthanc-dicomweb) are needed"),
]


def test_dicomweb_destination_config_resolves_files_and_rejects_bad_entries(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("node:\n  destinations:\n"
                    "    - {ae_title: PACS, host: 127.0.0.1, port: 4242}\n"
                    "    - {kind: dicomweb, url: 'https://pacs.example.org/dicom-web/', token_file: token,"
                    " ca_bundle: ca.pem, timeout_s: 15}\n")
    config = load_config(site, environ={}, base_dir=tmp_path)
    dimse, web = config.node.destinations
    assert dimse.outbox_key == "PACS@127.0.0.1:4242"
    assert isinstance(web, DicomwebDestination)
    assert web.outbox_key == "dicomweb:https://pacs.example.org/dicom-web"
    assert web.token_file == tmp_path / "token" and web.ca_bundle == tmp_path / "ca.pem" and web.timeout_s == 15
    for bad in ("{kind: dicomweb, url: 'ftp://x'}", "{kind: dicomweb, url: 'http://x', token_file: a,"
                " auth_header_file: b}", "{kind: carrier-pigeon, ae_title: A, host: h}"):
        site.write_text(f"node:\n  destinations: [{bad}]\n")
        with pytest.raises(ConfigError):
            load_config(site, environ={}, base_dir=tmp_path)


def _outbox(node) -> list[dict]:
    state = StateStore(node.workdir / "state.sqlite3", readonly=True)
    try:
        return [r for study in state.summary(recent=10)["recent_studies"]
                for r in state.outbox_rows(study["study_uid"])]
    finally:
        state.close()


def _wait(predicate, timeout_s: float, what: str, node) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert node.alive(), node.log_text()[-3000:]
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"{what} not within {timeout_s} s; outbox {_outbox(node)}\n{node.log_text()[-3000:]}")


@needs_peers[0]
@needs_peers[1]
def test_results_wait_while_dicomweb_is_down_and_are_stored_by_stow_rs_when_it_returns(tmp_path):
    archive_port = free_tcp_port()  # nothing listens here until the archive starts below
    url = f"http://{HOST}:{archive_port}/dicom-web"
    header = tmp_path / "auth-header"
    header.write_text("Authorization: Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() + "\n")
    node = start_node(tmp_path / "node", MODEL, quiet_period_s=1.0, send_retries=60, send_backoff_s=0.3,
                      send_backoff_max_s=1.0,
                      destinations=[{"kind": "dicomweb", "url": url, "auth_header_file": str(header),
                                     "timeout_s": 10}])
    archive = None
    try:
        study = make_synthetic_study(tmp_path / "study", seed=5, rows=128, cols=128, pixel_spacing=(1.875, 1.875),
                                     n_slices=6, include_distractors=False)
        sent = store_files(study.t2_paths, "STORESCU", node.ae_title, HOST, node.port)
        assert all(status == 0 for _, status, _ in sent), sent

        # Down: the results are queued and fail (connection refused), staying pending for a retry.
        _wait(lambda: any(r["attempts"] >= 2 and r["status"] == "pending" for r in _outbox(node)), 240,
              "a failed STOW-RS attempt", node)
        rows = _outbox(node)
        assert {r["destination"] for r in rows} == {f"dicomweb:{url}"}
        assert not any(r["status"] in ("sent", "dead") for r in rows)
        assert all("Connection" in (r["last_status"] or "") for r in rows if r["attempts"]), rows

        # Up again: everything pending is delivered.
        archive = start_dicomweb_archive(tmp_path / "archive", http_port=archive_port, users={USER: PASSWORD})
        _wait(lambda: all(r["status"] == "sent" for r in _outbox(node)), 60, "delivery after the outage", node)
        rows = _outbox(node)
        assert {r["sop_class_uid"] for r in rows} >= {SEG_STORAGE, COMPREHENSIVE_3D_SR}

        # The archive enforces the credential: without it QIDO-RS is refused, with it the results are
        # found in the source study, one instance per outbox row.
        assert requests.get(f"{url}/studies", timeout=10).status_code == 401
        client = make_client(DicomwebDestination(url=url, auth_header_file=header))
        found = client.search_for_instances(study_instance_uid=study.study_uid,
                                            fields=["SOPClassUID", "SOPInstanceUID"])
        found_uids = {item["00080018"]["Value"][0] for item in found}
        assert {r["sop_instance_uid"] for r in rows} <= found_uids
        seg_uid = next(r["sop_instance_uid"] for r in rows if r["sop_class_uid"] == SEG_STORAGE)
        seg = client.retrieve_instance(study.study_uid, next(
            item["0020000E"]["Value"][0] for item in client.search_for_instances(
                study_instance_uid=study.study_uid, fields=["SeriesInstanceUID"],
                search_filters={"SOPInstanceUID": seg_uid})), seg_uid)
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == study.study_uid
        assert len(seg.SegmentSequence) >= 4

        # Same audit trail as C-STORE: retries, then "sent", for the DICOMweb destination.
        audit = [json.loads(line) for line in (tmp_path / "node" / "audit.jsonl").read_text().splitlines()]
        sends = [a for a in audit if a.get("event") == "send" and a.get("destination") == f"dicomweb:{url}"]
        assert any(a["result"] == "retry" for a in sends) and any(a["result"] == "sent" for a in sends), sends
    finally:
        node.stop()
        if archive is not None:
            archive.stop()
