"""Reliability and security of the receive path, without a model: access control, transport
and data set limits, disk pressure, DICOM TLS (with AE titles bound to client certificates),
the audit trail, log privacy, the health check; and, in the pipeline, a decoder panic made a
study's failure, and the accounting of result sets the crash tests and the soak run rely on.

Every listener runs on a free loopback port and is stopped by the test; the peers are DCMTK
``storescu``/``storescp``/``echoscu``, pynetdicom and raw sockets. Nothing here needs a GPU or
the model bundle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from app.config import AllowedPeer, PeerAddress, load_config
from app.node.audit import AuditLog, read_audit
from app.node.listener import Listener
from app.node.logs import KeyValueFormatter, uid_hash
from app.node.net import echo, free_tcp_port
from app.node.sender import Sender
from app.node.spool import Spool
from app.node.state import StateStore, destination_key
from app.node.status import health
from paraspinal.synthetic_study import make_synthetic_study
from reliability.fuzz import part10_bytes
from reliability.harness import HOST, PROJECT_ROOT, wait_until
from reliability.scu import send_files

needs_dcmtk = pytest.mark.skipif(subprocess.run(["which", "storescu"], capture_output=True).returncode != 0,
                                 reason="DCMTK not installed")
needs_openssl = pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                                   reason="openssl not installed")


def _settings(tmp_path: Path, **overrides):
    base = load_config(environ={}).node
    values = dict(port=0, bind_address=HOST, spool_dir=tmp_path / "spool", state_db=tmp_path / "state.sqlite3",
                  results_dir=tmp_path / "results", failed_dir=tmp_path / "failed", min_free_disk_mb=1,
                  audit_log=tmp_path / "audit.jsonl", acse_timeout_s=10, dimse_timeout_s=20, network_timeout_s=20)
    values.update(overrides)
    return dataclasses.replace(base, **values)


@contextlib.contextmanager
def running_listener(tmp_path: Path, **overrides):
    settings = _settings(tmp_path, **overrides)
    state = StateStore(settings.state_db)
    audit = AuditLog(settings.audit_log)
    listener = Listener(settings, Spool(settings.spool_dir), state, audit)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()
        state.close()
        audit.close()


class LogLines(logging.Handler):
    """Collects the node's log lines exactly as it would print them."""

    def __init__(self, hash_uids: bool = False) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(KeyValueFormatter(hash_uids))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def node_log():
    handler = LogLines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


def _mr(study: str | None = None, pixel_bytes: int = 0, patient: str = "DOE^JANE") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate = "MR", patient, "PID-4711", "19610203"
    if pixel_bytes:
        side = int((pixel_bytes // 2) ** 0.5)
        ds.Rows = ds.Columns = side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = bytes(side * side * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MRImageStorage, ds.SOPInstanceUID
    return ds


def _associate(port: int, calling_ae: str = "PYSCU", syntaxes=(ExplicitVRLittleEndian,), **kwargs):
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(MRImageStorage, list(syntaxes))
    ae.add_requested_context(Verification)
    return ae.associate(HOST, port, ae_title="PARASPINAL", **kwargs)


def _file_with_dataset_bytes(path: Path, sop_class: str, sop_uid: str, transfer_syntax: str, data: bytes) -> Path:
    """A Part 10 file whose data set is exactly ``data`` (as a peer would put it on the wire)."""
    path.write_bytes(part10_bytes(sop_class, sop_uid, transfer_syntax, data))
    return path


def _send_raw(port: int, path: Path, calling_ae: str = "PYSCU") -> int | None:
    """C-STORE a file's data set bytes as they are (no decode/re-encode); returns status or None."""
    ((_, status),) = send_files([path], port, calling_ae, raw=True)
    return status


def _encoded(ds: Dataset) -> bytes:
    """The data set in explicit VR little endian, without file meta."""
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


def _spooled(listener: Listener) -> list[Path]:
    return sorted(p for p in listener.spool.root.rglob("*") if p.is_file())


# ---- access -------------------------------------------------------------------------------------


def test_allow_list_checks_the_source_address_as_well_as_the_ae_title(tmp_path):
    """SCU is allowed from 127.0.0.1 only: the same AE title from 127.0.0.2 (another loopback
    address) and another AE title from 127.0.0.1 get A-ASSOCIATE-RJ, and both are audited."""
    with running_listener(tmp_path, allowed_peers=(AllowedPeer("SCU", "127.0.0.1"),)) as node:
        good = _associate(node.port, "SCU", bind_address=("127.0.0.1", 0))
        assert good.is_established
        good.release()
        wrong_address = _associate(node.port, "SCU", bind_address=("127.0.0.2", 0))
        assert wrong_address.is_rejected
        wrong_title = _associate(node.port, "OTHER", bind_address=("127.0.0.1", 0))
        assert wrong_title.is_rejected
    rejected = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "association_rejected"]
    assert {(e["calling_ae"], e["peer_address"]) for e in rejected} == {("SCU", "127.0.0.2"), ("OTHER", "127.0.0.1")}


def test_health_check_ae_title_may_echo_but_not_store(tmp_path):
    with running_listener(tmp_path, allowed_peers=(AllowedPeer("SCU", "127.0.0.1"),)) as node:
        assert echo(HOST, node.port, "PARASPINAL", "HEALTHCHECK") == 0
        assoc = _associate(node.port, "HEALTHCHECK")
        assert assoc.is_established
        rsp = assoc.send_c_store(_mr())
        assoc.release()
        assert rsp.Status == 0x0124  # refused: not authorised
        assert _spooled(node) == []


def test_health_check_is_unhealthy_while_no_worker_can_analyse(tmp_path):
    """Fresh heartbeat and a listener that answers C-ECHO are not enough: with no worker that
    has the pipeline and the model loaded the node is unhealthy, and the reason names the
    worker's error; once a worker is ready it is healthy."""
    with running_listener(tmp_path) as node:
        now = time.time()
        info = {"heartbeat_at": str(now), "started_at": str(now - 5), "stopped_at": "", "port": str(node.port)}
        error = "ImportError: libcudart.so.13: cannot open shared object file: No such file or directory"
        healthy, why = health(node.settings, dict(info, workers_ready="0", worker_error=error))
        assert not healthy and why == f"no analysis worker can analyse: {error}"
        healthy, why = health(node.settings, dict(info, workers_ready="0", worker_error=""))
        assert not healthy and "still loading" in why
        assert health(node.settings, info)[0] is False  # a node that never said: not healthy either
        healthy, why = health(node.settings, dict(info, workers_ready="1", worker_error=""))
        assert healthy and "1 worker(s) ready" in why, why


# ---- transport and data set limits --------------------------------------------------------------


def test_max_pdu_is_announced_and_a_longer_pdu_aborts_only_that_association(tmp_path, node_log):
    with running_listener(tmp_path, max_pdu_size=16384) as node:
        assoc = _associate(node.port)
        assert assoc.is_established and assoc.acceptor.maximum_length == 16384
        # A P-DATA-TF PDU claiming 10 MB, straight onto the socket.
        assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">L", 10_000_000) + b"\x00" * 1024)
        wait_until(lambda: assoc.is_aborted or not assoc.is_alive(), 20, "the node to abort the association")
        assert "exceeds the announced maximum length 16384" in node_log.text()
        assert echo(HOST, node.port, "PARASPINAL", "PYSCU") == 0  # the node still serves


def test_over_large_data_sets_are_refused_and_a_runaway_one_is_cut_off(tmp_path, node_log):
    """max_dataset_mb 0.25: 0.4 MB gets 0xA700 with the reason logged; 3 MB (over twice the
    limit) is cut off while it arrives (association aborted); nothing reaches the spool."""
    with running_listener(tmp_path, max_dataset_mb=0.25) as node:
        assoc = _associate(node.port)
        rsp = assoc.send_c_store(_mr(pixel_bytes=400_000))
        assert rsp.Status == 0xA700
        assoc.release()
        assert "exceeds the limit of 0.25 MiB (max_dataset_mb)" in node_log.text()
        assoc = _associate(node.port)
        rsp = assoc.send_c_store(_mr(pixel_bytes=3_000_000))
        assert rsp is None or "Status" not in rsp
        wait_until(lambda: not assoc.is_established, 10, "the association to end")
        assert "twice max_dataset_mb" in node_log.text()
        assert _spooled(node) == []
        assert echo(HOST, node.port, "PARASPINAL", "PYSCU") == 0


def test_a_deflate_bomb_is_refused(tmp_path, node_log):
    """20 MB of zeros deflates to a few kB; the node inflates at most max_dataset_mb (1 MiB)."""
    ds = _mr(pixel_bytes=20_000_000)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 200_000
    with running_listener(tmp_path / "node", max_dataset_mb=1) as node:
        assert _send_raw(node.port, path) == 0xA700
        assert "inflates to more than 1 MiB" in node_log.text()
        assert _spooled(node) == []


def test_unreadable_or_mismatching_data_sets_get_a_failure_status_naming_the_problem(tmp_path, node_log):
    good = _mr(pixel_bytes=2048)
    raw = _encoded(good)
    cut = raw[: len(raw) - 700]  # ends inside the pixel data element's value
    other_class = _mr()
    other_class.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT, sent as MR
    with running_listener(tmp_path / "node") as node:
        cases = {
            "truncated": (_file_with_dataset_bytes(tmp_path / "a.dcm", MRImageStorage, good.SOPInstanceUID,
                                                   ExplicitVRLittleEndian, cut), 0xC000, "unreadable data set"),
            "garbage": (_file_with_dataset_bytes(tmp_path / "b.dcm", MRImageStorage, generate_uid(),
                                                 ExplicitVRLittleEndian, b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 64),
                        0xC000, "unreadable data set"),
            "wrong class": (_file_with_dataset_bytes(tmp_path / "c.dcm", MRImageStorage, other_class.SOPInstanceUID,
                                                     ExplicitVRLittleEndian, _encoded(other_class)),
                            0xA900, "differs from the request's"),
            "good": (_file_with_dataset_bytes(tmp_path / "d.dcm", MRImageStorage, good.SOPInstanceUID,
                                              ExplicitVRLittleEndian, raw), 0x0000, "event=instance_stored"),
        }
        for name, (path, status, message) in cases.items():
            assert _send_raw(node.port, path) == status, name
            assert message in node_log.text(), name
        assert [p.stem for p in _spooled(node)] == [good.SOPInstanceUID]


# ---- disk pressure --------------------------------------------------------------------------


@needs_dcmtk
def test_below_the_free_space_floor_storescu_gets_out_of_resources(tmp_path):
    study = make_synthetic_study(tmp_path / "study", seed=2, rows=32, cols=32, pixel_spacing=(8.0, 8.0), n_slices=2,
                                 include_distractors=False)
    with running_listener(tmp_path / "node", min_free_disk_mb=10 ** 9) as node:
        run = subprocess.run(["storescu", "-v", "-aet", "STORESCU", "-aec", "PARASPINAL", HOST, str(node.port),
                              "+sd", "+r", str(study.root)], capture_output=True, text=True, timeout=60)
        output = run.stdout + run.stderr
        assert run.returncode != 0 and "Received Store Response (Refused: OutOfResources)" in output, output
        assert _spooled(node) == []


def _send_sizes(port: int, sizes: list[int], study: str) -> list[tuple[Dataset, int]]:
    out = []
    assoc = _associate(port)
    assert assoc.is_established
    for size in sizes:
        ds = _mr(study=study, pixel_bytes=size)
        rsp = assoc.send_c_store(ds)
        out.append((ds, int(rsp.Status)))
    assoc.release()
    return out


def _assert_whole_or_absent(spool: Path, sent: list[tuple[Dataset, int]]) -> None:
    """Acknowledged instances are on disk, whole (their data set decodes to the pixels sent);
    refused ones left nothing; no temp file remains."""
    files = {p.stem: p for p in spool.rglob("*.dcm")}
    for ds, status in sent:
        if status == 0:
            stored = pydicom.dcmread(files[ds.SOPInstanceUID])
            assert stored.PixelData == ds.PixelData
        else:
            assert status == 0xA700 and ds.SOPInstanceUID not in files
    assert [p for p in spool.rglob(".*") if p.is_file()] == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_file_system_never_leaves_a_truncated_file(tmp_path, node_log):
    """The spool on a 1 MiB tmpfs (needs root to mount; skipped otherwise, the RLIMIT_FSIZE
    test below covers the same path everywhere): the instance that does not fit gets
    0xA700 (ENOSPC), the ones acknowledged before are whole, no temp file is left."""
    mount = tmp_path / "small_fs"
    if not _mount_tmpfs(mount, "1m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        with running_listener(tmp_path / "node", spool_dir=mount / "spool", min_free_disk_mb=0) as node:
            sent = _send_sizes(node.port, [300_000] * 5, generate_uid())
            assert [s for _, s in sent].count(0) >= 2 and sent[-1][1] == 0xA700, [s for _, s in sent]
            _assert_whole_or_absent(mount / "spool", sent)
            assert "No space left on device" in node_log.text()
            # The floor: with min_free_disk_mb above what is left, even a small one is refused.
            node.settings = dataclasses.replace(node.settings, min_free_disk_mb=1)
            (status,) = [s for _, s in _send_sizes(node.port, [1000], generate_uid())]
            assert status == 0xA700 and "spool disk low" in node_log.text()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_write_cut_short_by_a_file_size_limit_never_leaves_a_truncated_file(tmp_path):
    """The intake in its own process with RLIMIT_FSIZE 1 MiB: a 1.5 MB instance fails
    mid-write (EFBIG), gets 0xA700, leaves nothing; small ones before and after are whole."""
    config = tmp_path / "node.yaml"
    port = free_tcp_port()
    config.write_text(yaml.safe_dump({"node": {
        "port": port, "bind_address": HOST, "spool_dir": str(tmp_path / "spool"),
        "state_db": str(tmp_path / "state.sqlite3"), "audit_log": str(tmp_path / "audit.jsonl"),
        "min_free_disk_mb": 0, "max_dataset_mb": 16}}))

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))

    log = open(tmp_path / "intake.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "reliability.intake", "--config", str(config)], cwd=PROJECT_ROOT,
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert wait_until(lambda: echo(HOST, port, "PARASPINAL", "PYSCU", timeout_s=2) == 0, 30, "intake up")
        sent = _send_sizes(port, [100_000, 1_500_000, 100_000], generate_uid())
        assert [s for _, s in sent] == [0, 0xA700, 0]
        _assert_whole_or_absent(tmp_path / "spool", sent)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert "spool write failed: OSError" in (tmp_path / "intake.log").read_text()


# ---- malformed input in the pipeline -------------------------------------------------------------


def test_a_decoder_panic_is_the_studys_load_failure_naming_the_file(tmp_path):
    """A crafted RLE frame (segment offsets that let the first segment decode 2 bytes too many)
    makes the Rust RLE decoder panic with pyo3's PanicException, a BaseException that is no
    Exception; load_stack turns it into the study's StackError naming the file."""
    from app.config import load_config
    from paraspinal.dicom_index import index_folder
    from paraspinal.series_selection import select_series
    from paraspinal.stacks import StackError, load_stack
    from reliability.harness import make_codec_crash_study

    poison = make_codec_crash_study(tmp_path / "poison")
    with pytest.raises(BaseException) as raised:  # the panic itself, straight from the decoder
        pydicom.dcmread(poison.paths[0]).pixel_array
    assert type(raised.value).__name__ == "PanicException" and not isinstance(raised.value, Exception)
    (study,) = index_folder(tmp_path / "poison").studies.values()
    chosen = select_series(study, load_config(environ={}).selection).chosen
    with pytest.raises(StackError) as failed:
        load_stack(chosen.stacks[0], chosen.series_uid, 1)
    message = str(failed.value)
    assert message.startswith(f"{poison.paths[0].name}: pixel data could not be decoded"), message
    assert "PanicException" in message


def test_a_stage_records_what_derives_from_base_exception_but_lets_ctrl_c_and_exit_through():
    from paraspinal.dicom_index import StudyRecord
    from paraspinal.study_job import JobStatus, StudyJob

    class PanicException(BaseException):  # as pyo3 defines it
        pass

    job = StudyJob(study=StudyRecord("1.2.3"))
    with job.stage("load"):
        raise PanicException("index out of bounds")
    assert (job.status, job.failed_stage, job.reason) == (JobStatus.FAILED, "load",
                                                          "PanicException: index out of bounds")
    assert "load" in job.timings_s
    for stop in (KeyboardInterrupt(), SystemExit(3)):
        with pytest.raises(type(stop)):
            with StudyJob(study=StudyRecord("1.2.3")).stage("load"):
                raise stop


# ---- graceful stop of the listener ------------------------------------------------------------


def test_stopping_the_listener_lets_an_open_association_finish(tmp_path):
    study = make_synthetic_study(tmp_path / "study", seed=4, rows=32, cols=32, pixel_spacing=(8.0, 8.0), n_slices=6,
                                 include_distractors=False)
    settings = _settings(tmp_path / "node")
    state = StateStore(settings.state_db)
    node = Listener(settings, Spool(settings.spool_dir), state)
    node.start()
    port = node.port
    stopper = threading.Thread(target=node.stop, args=(10.0,))

    def on_ack(path, status):
        if not stopper.is_alive() and not stopper.ident:
            stopper.start()  # stop while the association is half way
        time.sleep(0.2)

    results = send_files(study.all_paths, port, "PYSCU", on_ack=on_ack)
    stopper.join(20)
    state.close()
    assert [s for _, s in results] == [0] * len(study.all_paths)
    assert echo(HOST, port, "PARASPINAL", "PYSCU", timeout_s=2) is None  # no longer listening


# ---- DICOM TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from reliability.pki import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_settings(pki, **more):
    return dict(tls_enabled=True, tls_certificate=pki.server_cert, tls_private_key=pki.server_key,
                tls_ca_certificates=pki.ca_cert, tls_require_client_certificate=True, **more)


def _storescu_tls(args: list[str], port: int, path: Path, calling_ae: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", *args, "-aet", calling_ae, "-aec", "PARASPINAL", HOST, str(port), str(path)],
                          capture_output=True, text=True, timeout=60)


@needs_dcmtk
@needs_openssl
def test_tls_storescu_with_a_trusted_client_certificate_stores(tmp_path, pki):
    study = make_synthetic_study(tmp_path / "study", seed=6, rows=32, cols=32, pixel_spacing=(8.0, 8.0), n_slices=2,
                                 include_distractors=False)
    with running_listener(tmp_path / "node", **_tls_settings(pki)) as node:
        for path in study.all_paths:
            run = _storescu_tls(["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)],
                                node.port, path)
            assert run.returncode == 0, run.stderr
        assert len(_spooled(node)) == len(study.all_paths)
    sessions = [e for e in read_audit(tmp_path / "node" / "audit.jsonl") if e["event"] == "association"]
    assert sessions and all(e["tls"] and e["tls_subject"] == "commonName=scanner-client" for e in sessions)


@needs_dcmtk
@needs_openssl
def test_tls_turns_away_peers_without_a_trusted_certificate_and_a_stalled_handshake_blocks_nobody(tmp_path, pki):
    study = make_synthetic_study(tmp_path / "study", seed=7, rows=32, cols=32, pixel_spacing=(8.0, 8.0), n_slices=1,
                                 include_distractors=False)
    (path,) = study.all_paths
    with running_listener(tmp_path / "node", **_tls_settings(pki)) as node:
        refused = {
            "no client certificate": ["+tla", "+cf", str(pki.ca_cert)],
            "untrusted client certificate": ["+tls", str(pki.rogue_client_key), str(pki.rogue_client_cert),
                                             "+cf", str(pki.ca_cert)],
            "plain DICOM": [],
        }
        for name, args in refused.items():
            run = _storescu_tls(args, node.port, path)
            assert run.returncode != 0, name
        # A client that opens TCP and never says a word: others are still served at once.
        with socket.create_connection((HOST, node.port)):
            start = time.monotonic()
            run = _storescu_tls(["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)],
                                node.port, path)
            assert run.returncode == 0, run.stderr
            assert time.monotonic() - start < 8  # acse_timeout_s is 10
        assert [p.stem for p in _spooled(node)] == [pydicom.dcmread(path).SOPInstanceUID]
    failures = [e for e in read_audit(tmp_path / "node" / "audit.jsonl") if e["event"] == "tls_handshake_failed"]
    assert len(failures) >= 3


def _sha256_of_pem(path: Path) -> str:
    import hashlib
    import ssl

    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


@needs_dcmtk
@needs_openssl
def test_tls_client_certificates_bound_to_ae_titles(tmp_path, pki):
    """allowed_peers binds SCANNER1 to the client certificate's subject CN and FPCHECK to its
    SHA-256 fingerprint (written with colons, upper case); OTHER is allowed without a binding.
    Every peer below presents a certificate the CA signed (the TLS handshake succeeds):

    * SCANNER1 and FPCHECK with the bound certificate store;
    * OTHER with SCANNER1's certificate is refused (the certificate belongs to another AE title);
    * SCANNER1 with another trusted certificate (the node's own) is refused;

    each refusal an A-ASSOCIATE-RJ, logged and audited with the reason; nothing of theirs is spooled."""
    study = make_synthetic_study(tmp_path / "study", seed=10, rows=32, cols=32, pixel_spacing=(8.0, 8.0), n_slices=4,
                                 include_distractors=False)
    paths = study.all_paths
    fingerprint = _sha256_of_pem(pki.client_cert).upper()
    peers = (AllowedPeer("SCANNER1", HOST, tls_subject_cn="scanner-client"),
             AllowedPeer("FPCHECK", HOST, tls_sha256=":".join(fingerprint[i:i + 2] for i in range(0, 64, 2))),
             AllowedPeer("OTHER", HOST))
    client = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)]
    other_cert = ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca_cert)]
    with running_listener(tmp_path / "node", **_tls_settings(pki, allowed_peers=peers)) as node:
        stored = [_storescu_tls(client, node.port, paths[0], "SCANNER1"),
                  _storescu_tls(client, node.port, paths[1], "FPCHECK")]
        assert [r.returncode for r in stored] == [0, 0], [r.stderr for r in stored]
        refused = {"OTHER": _storescu_tls(client, node.port, paths[2], "OTHER"),
                   "SCANNER1": _storescu_tls(other_cert, node.port, paths[3], "SCANNER1")}
        for ae, run in refused.items():
            assert run.returncode != 0 and "Association Rejected" in run.stdout + run.stderr, (ae, run.stderr)
        spooled = {p.stem for p in _spooled(node)}
    assert spooled == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths[:2]}
    events = read_audit(tmp_path / "node" / "audit.jsonl")
    rejected = {e["calling_ae"]: e["reason"] for e in events if e["event"] == "association_rejected"}
    assert rejected.keys() == {"OTHER", "SCANNER1"}
    assert "is bound to AE title FPCHECK, SCANNER1, not OTHER" in rejected["OTHER"]
    assert "not the one bound to calling AE title SCANNER1" in rejected["SCANNER1"]
    assert "node-server" in rejected["SCANNER1"]
    sessions = {e["calling_ae"]: e["tls_subject"] for e in events if e["event"] == "association"}
    assert sessions == {"SCANNER1": "commonName=scanner-client", "FPCHECK": "commonName=scanner-client"}


def test_certificate_binding_rules():
    """The rules behind the test above, without sockets: no binding, no check; a bound AE title
    needs its certificate (CN and/or fingerprint, both when both are given); a bound
    certificate serves only its AE title."""
    from app.node.net import PeerCertificate, certificate_binding_refusal

    scanner = PeerCertificate("scanner-client", "ab" * 32)
    other = PeerCertificate("other", "cd" * 32)
    assert certificate_binding_refusal((AllowedPeer("A"), AllowedPeer("B")), "A", None) is None
    peers = (AllowedPeer("A", tls_subject_cn="scanner-client"), AllowedPeer("B"),
             AllowedPeer("C", tls_subject_cn="other", tls_sha256="AB:" * 31 + "AB"))
    assert certificate_binding_refusal(peers, "A", scanner) is None
    assert certificate_binding_refusal(peers, " A ", scanner) is None  # AE titles are padded with spaces
    assert "not the one bound" in certificate_binding_refusal(peers, "A", other)
    assert "no client certificate" in certificate_binding_refusal(peers, "A", None)
    assert "bound to AE title A, not B" in certificate_binding_refusal(peers, "B", scanner)
    assert certificate_binding_refusal(peers, "B", PeerCertificate("unbound", "ef" * 32)) is None
    assert certificate_binding_refusal(peers, "C", PeerCertificate("other", "ab" * 32)) is None
    assert "not the one bound" in certificate_binding_refusal(peers, "C", other)  # CN right, fingerprint wrong


def test_allowed_peer_binding_from_yaml(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"node": {"allowed_peers": [
        {"ae_title": "MR1", "host": "10.0.0.5", "tls_subject_cn": "mr1.example.org"}, {"ae_title": "MR2"}]}}))
    peers = load_config(site, environ={}).node.allowed_peers
    assert peers == (AllowedPeer("MR1", "10.0.0.5", tls_subject_cn="mr1.example.org"), AllowedPeer("MR2"))
    assert peers[0].tls_bound and not peers[1].tls_bound


@needs_dcmtk
@needs_openssl
def test_sender_delivers_over_tls_and_the_health_check_speaks_tls(tmp_path, pki):
    """Results to DCMTK storescp over TLS (storescp requires the node's client certificate);
    ``status --health`` logic answers healthy against a TLS listener, unhealthy when stale."""
    from tests.peers import _spawn, Peer

    received = tmp_path / "pacs"
    received.mkdir()
    port = free_tcp_port()
    process, log_path, handle = _spawn("storescp", [
        "storescp", "--aetitle", "TLSPACS", "--output-directory", str(received), "+tls", str(pki.client_key),
        str(pki.client_cert), "+cf", str(pki.ca_cert), "--require-peer-cert", str(port)], tmp_path)
    pacs = Peer("storescp", process, "TLSPACS", port, tmp_path, log_path, handle)
    study = make_synthetic_study(tmp_path / "study", seed=8, rows=32, cols=32, pixel_spacing=(8.0, 8.0), n_slices=2,
                                 include_distractors=False)
    try:
        settings = _settings(tmp_path / "node", **_tls_settings(pki), send_retries=20, send_backoff_s=0.2,
                             send_backoff_max_s=0.5, destinations=(PeerAddress("TLSPACS", HOST, port, tls=True),))
        state = StateStore(settings.state_db)
        objects = [(p, MRImageStorage, pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in study.all_paths]
        state.enqueue_outputs(study.study_uid, objects, [destination_key("TLSPACS", HOST, port)])
        sender = Sender(settings, state, AuditLog(settings.audit_log))
        wait_until(lambda: sender.send_due() is not None and state.summary()["outbox"]["sent"] == len(objects), 60,
                   "results sent over TLS", interval_s=0.3)
        assert len(list(received.glob("*"))) == len(objects)
        sends = [e for e in read_audit(settings.audit_log) if e["event"] == "send" and e["result"] == "sent"]
        assert len(sends) == len(objects)

        node = Listener(settings, Spool(settings.spool_dir), state)
        node.start()
        try:
            now = time.time()
            info = {"heartbeat_at": str(now), "started_at": str(now - 5), "stopped_at": "", "port": str(node.port),
                    "workers_ready": "1"}
            healthy, why = health(settings, info)
            assert healthy, why
            stale = dict(info, heartbeat_at=str(now - 600))
            assert health(settings, stale)[0] is False
            plain = dataclasses.replace(settings, tls_enabled=False)
            assert health(plain, info)[0] is False  # plain DICOM cannot pass the TLS port
        finally:
            node.stop()
            state.close()
    finally:
        pacs.stop()


# ---- accounting of the crash tests and the soak run ------------------------------------------------


def test_accounting_tells_a_resent_instance_from_a_second_result_set(tmp_path):
    """What the archive received, per study: the SEG sent twice with the same UID and bytes
    (a resend after a crash: idempotent) is a re-sent instance, not a second result set; an SR
    and SEG under new UIDs (another analysis' objects) are a duplicate result set, and the
    soak table reports both apart (and fails on the latter)."""
    from types import SimpleNamespace

    from reliability import soak
    from reliability.harness import SEG_STORAGE, StudyFiles, account

    sr_class, pdf_class = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.104.1"
    studies, receipts = [], []
    for name, extra_set in (("once", False), ("twice", True)):
        study_uid = generate_uid()
        results = tmp_path / "results" / study_uid
        results.mkdir(parents=True)
        outputs = {}
        for kind, sop_class in (("seg_stack1", SEG_STORAGE), ("sr", sr_class), ("report_pdf", pdf_class)):
            outputs[kind] = (generate_uid(), sop_class)
            _file_with_dataset_bytes(results / f"{kind}.dcm", sop_class, outputs[kind][0], ExplicitVRLittleEndian, b"")
        (results / "result.json").write_text(json.dumps({"series_decisions": [], "skipped_files": []}))
        sent = [(uid, cls, "same") for uid, cls in outputs.values()] + [(outputs["seg_stack1"][0], SEG_STORAGE, "same")]
        if extra_set:
            sent += [(generate_uid(), SEG_STORAGE, "other"), (generate_uid(), sr_class, "other")]
        receipts += [{"sop": uid, "study": study_uid, "sop_class": cls, "sha256": digest} for uid, cls, digest in sent]
        studies.append(StudyFiles(study_uid, [], {}))
    node = SimpleNamespace(settings={"spool_dir": str(tmp_path / "spool"), "results_dir": str(tmp_path / "results")},
                           study=lambda uid: {"status": "done"})
    once, twice = account(node, SimpleNamespace(receipts=lambda: receipts), studies, {})
    assert (once.duplicates, once.seg_uids, once.sr_uids, once.result_sets, once.duplicate_result_sets) == (1, 1, 1, 1, 0)
    assert (twice.duplicates, twice.seg_uids, twice.sr_uids, twice.result_sets, twice.duplicate_result_sets) == \
        (1, 2, 2, 2, 1)
    phase = soak.Phase("crash")
    phase.add([once])
    assert (phase.resent, phase.duplicate_sets, phase.errors) == (1, 0, [])
    phase.add([twice])
    assert (phase.resent, phase.duplicate_sets) == (2, 1) and "result sets 2" in phase.errors[0]
    table = soak.format_table([phase], "params")
    assert "dup result sets" in table and "re-sent (same UID)" in table


# ---- audit and log privacy --------------------------------------------------------------------


@needs_dcmtk
@pytest.mark.parametrize("hash_uids", [False, True], ids=["log_uids_clear", "log_uids_hashed"])
def test_audit_trail_and_logs_name_studies_by_hash_and_never_the_patient(tmp_path, hash_uids):
    study = make_synthetic_study(tmp_path / "study", seed=9, rows=32, cols=32, pixel_spacing=(8.0, 8.0), n_slices=3)
    handler = LogLines(hash_uids)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        with running_listener(tmp_path / "node", allowed_peers=(AllowedPeer("STORESCU", HOST),)) as node:
            run = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PARASPINAL", HOST, str(node.port), "+sd",
                                  "+r", str(study.root)], capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
            subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "PARASPINAL", HOST, str(node.port)],
                           capture_output=True, timeout=30)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    audit_text = (tmp_path / "node" / "audit.jsonl").read_text()
    events = read_audit(tmp_path / "node" / "audit.jsonl")
    (session,) = [e for e in events if e["event"] == "association"]
    assert session["calling_ae"] == "STORESCU" and session["peer_address"] == HOST
    assert session["studies"] == {uid_hash(study.study_uid): {"stored": len(study.all_paths), "duplicate": 0,
                                                              "refused": 0}}
    assert session["started"] <= session["ended"]
    assert [e["calling_ae"] for e in events if e["event"] == "association_rejected"] == ["INTRUDER"]
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.all_paths]
    for uid in [study.study_uid, *sops]:
        assert uid not in audit_text
    log_text = handler.text()
    assert "event=instance_stored" in log_text
    for identity in ("PHANTOM", "19700101"):  # synthetic PatientName/ID and birth date
        assert identity not in log_text and identity not in audit_text
    if hash_uids:
        assert f"uid:{uid_hash(study.study_uid)}" in log_text
        assert all(uid not in log_text for uid in [study.study_uid, *sops])
        assert "transfer_syntax=1.2.840.10008.1.2.1" in log_text  # standard UIDs stay readable
    else:
        assert f"study={study.study_uid}" in log_text


def test_audit_lines_are_appended_whole_by_concurrent_writers(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    threads = [threading.Thread(target=lambda i=i: [audit.write("send", writer=i, n=n, pad="x" * 500)
                                                    for n in range(50)]) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit.close()
    again = AuditLog(tmp_path / "audit.jsonl")  # reopened: appends, never truncates
    again.write("node_started")
    again.close()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 401 and all(json.loads(line)["event"] for line in lines)
    assert json.loads(lines[-1])["event"] == "node_started"
