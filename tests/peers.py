"""Real DICOM peers for the node tests, each on free loopback ports, started and stopped by the test.

* :func:`start_storescp`: DCMTK ``storescp`` as a PACS that files what it receives;
* :func:`start_orthanc`: Orthanc with a generated configuration and a Lua script that
  auto-routes stable MR series to the node;
* :func:`start_node`: the node itself, ``python -m app serve``, with a site configuration.

Every start waits (bounded) until the peer answers, and every peer's ``stop()`` ends the
process it started (SIGTERM, then SIGKILL) and closes its log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

import pydicom
import yaml
from pydicom.errors import InvalidDicomError

from app.node.net import free_tcp_port, wait_for_echo

HOST = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def tool_available(name: str) -> bool:
    return shutil.which(name) is not None


@dataclass
class Peer:
    """A started peer process."""

    name: str
    process: subprocess.Popen
    ae_title: str
    port: int
    workdir: Path
    log_path: Path
    _log: IO = field(repr=False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


def _spawn(name: str, args: Sequence[str], workdir: Path,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path, IO]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    handle = open(log_path, "wb")
    process = subprocess.Popen(list(args), stdout=handle, stderr=subprocess.STDOUT, cwd=workdir,
                               env={**os.environ, **(env or {})}, start_new_session=True)
    return process, log_path, handle


def _started(peer: Peer, timeout_s: float, calling_ae: str = "ECHOSCU") -> Peer:
    if not wait_for_echo(HOST, peer.port, peer.ae_title, timeout_s, calling_ae, alive=peer.alive):
        peer.stop()
        raise RuntimeError(f"{peer.name} did not answer C-ECHO within {timeout_s} s; log:\n{peer.log_text()[-3000:]}")
    return peer


def start_storescp(workdir: Path, ae_title: str = "PACS", port: int | None = None, timeout_s: float = 20.0) -> Peer:
    """DCMTK storescp filing every instance (any storage SOP class, any transfer syntax) into
    ``workdir/received`` as ``<modality prefix>.<SOP Instance UID>.dcm``; on a free port
    unless ``port`` is given."""
    received = workdir / "received"
    received.mkdir(parents=True, exist_ok=True)
    port = port or free_tcp_port()
    process, log_path, handle = _spawn("storescp", [
        "storescp", "--aetitle", ae_title, "--output-directory", str(received), "+xa",
        "--filename-extension", ".dcm", "--verbose", str(port)], workdir)
    return _started(Peer("storescp", process, ae_title, port, workdir, log_path, handle), timeout_s)


def received_by_sop_class(workdir: Path, study_uid: str) -> dict[str, list[Path]]:
    """The files storescp (``start_storescp``) has filed for one study so far, by SOP Class UID. storescp
    writes each file in place, so a poll can meet one half-written: a file that does not parse yet is
    left for the next poll rather than failing the caller."""
    found: dict[str, list[Path]] = {}
    for path in (workdir / "received").glob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study, sop_class = ds.StudyInstanceUID, str(ds.SOPClassUID)
        except (InvalidDicomError, EOFError, OSError, AttributeError):
            continue  # still being written
        if study == study_uid:
            found.setdefault(sop_class, []).append(path)
    return found


LUA_ROUTE_MR = """-- Auto-routing: every MR series, once stable, goes to the node, and every SEG series (a
-- spine-label SEG is the node's lumbar level source; the node keeps but ignores any other SEG,
-- its own included, so the results it sends here and that come back cannot loop it). Never SR.
-- Lua's SendToModality() sends one instance; a whole series goes through the REST API.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'MR' or tags['Modality'] == 'SEG' then
    print('routing stable ' .. tags['Modality'] .. ' series ' .. seriesId .. ' to {modality}')
    RestApiPost('/modalities/{modality}/store', seriesId)
  end
end
"""


@dataclass
class Orthanc(Peer):
    http_port: int = 0

    def rest(self, method: str, path: str, body: bytes | dict | None = None, timeout_s: float = 30.0) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"http://{HOST}:{self.http_port}{path}", data=data, method=method)
        if isinstance(body, dict):
            request.add_header("Content-Type", "application/json")
        elif body is not None:
            request.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def find_series(self, study_uid: str) -> list[dict]:
        """Every series of a study, each with its MainDicomTags and Instances."""
        return self.rest("POST", "/tools/find", {"Level": "Series", "Expand": True,
                                                   "Query": {"StudyInstanceUID": study_uid}}) or []


def start_orthanc(workdir: Path, node_ae: str, node_port: int, ae_title: str = "ORTHANC",
                  stable_age_s: int = 2, timeout_s: float = 60.0) -> Orthanc:
    """Orthanc on free loopback ports, storage under ``workdir``, routing stable MR series to
    the node (``node_ae`` at 127.0.0.1:``node_port``). Only the node may C-STORE to it over
    DICOM (the tests upload over REST)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_tcp_port(), free_tcp_port()
    lua = workdir / "route.lua"
    lua.write_text(LUA_ROUTE_MR.replace("{modality}", "node"))
    config = {
        "Name": "node-test-orthanc",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {"node": [node_ae, HOST, node_port]},
        # Orthanc 1.10 cannot bind to loopback only: accept DICOM only from the node's AE at 127.0.0.1.
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomCheckModalityHost": True,
        "LuaScripts": [str(lua)],
        "StableAge": stable_age_s,
        "Plugins": [],
        "SaveJobs": False,
        "DicomScuTimeout": 30,
        "DicomAssociationCloseDelay": 0,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    process, log_path, handle = _spawn("orthanc", ["Orthanc", "--verbose", str(config_path)], workdir)
    orthanc = Orthanc("orthanc", process, ae_title, dicom_port, workdir, log_path, handle, http_port=http_port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not orthanc.alive():
            break
        try:
            orthanc.rest("GET", "/system", timeout_s=2.0)
            return orthanc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    orthanc.stop()
    raise RuntimeError(f"Orthanc did not start within {timeout_s} s; log:\n{orthanc.log_text()[-3000:]}")


def node_site_config(workdir: Path, port: int, **overrides: Any) -> dict:
    """A node section for tests: loopback, its own folders under ``workdir``, short timings."""
    node = {
        "ae_title": "PARASPINAL", "bind_address": HOST, "port": port, "allowed_peers": [],
        "max_associations": 8, "acse_timeout_s": 10, "dimse_timeout_s": 30, "network_timeout_s": 30,
        "quiet_period_s": 1.0,
        "spool_dir": str(workdir / "spool"), "state_db": str(workdir / "state.sqlite3"),
        "results_dir": str(workdir / "results"), "failed_dir": str(workdir / "failed"),
        "workers": 1, "min_free_disk_mb": 10, "destinations": [],
        "send_retries": 2, "send_backoff_s": 0.2, "send_backoff_max_s": 1.0,
    }
    node.update(overrides)
    return {"node": node}


def start_node(workdir: Path, model_path: Path, timeout_s: float = 120.0, sections: dict | None = None,
               **overrides: Any) -> Peer:
    """``python -m app serve`` with a site configuration under ``workdir`` (see :func:`node_site_config`);
    ``sections``: other configuration sections (e.g. ``learning``) merged in as given."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = overrides.pop("port", None) or free_tcp_port()
    site = {**node_site_config(workdir, port, **overrides), **(sections or {})}
    config_path = workdir / "node.yaml"
    config_path.write_text(yaml.safe_dump(site, sort_keys=False))
    process, log_path, handle = _spawn("node", [
        sys.executable, "-m", "app", "--config", str(config_path), "serve", "--model", str(model_path)],
        workdir, env={"PYTHONPATH": str(PROJECT_ROOT)})
    peer = Peer("node", process, site["node"]["ae_title"], port, workdir, log_path, handle)
    allowed = site["node"]["allowed_peers"]
    return _started(peer, timeout_s, allowed[0]["ae_title"] if allowed else "ECHOSCU")


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def model_under_test() -> Path | None:
    """The bundle the tests run: ``$PARASPINAL_TEST_MODEL`` or the shipped one; None when neither loads."""
    from app.config import DEFAULT_MODEL_PATH
    from paraspinal.model_bundle import BundleError, find_bundle

    for candidate in filter(None, [os.environ.get("PARASPINAL_TEST_MODEL"), DEFAULT_MODEL_PATH]):
        try:
            return find_bundle(Path(candidate))
        except BundleError:
            continue
    return None


def start_dicomweb_archive(workdir: Path, http_port: int | None = None, users: dict[str, str] | None = None,
                           timeout_s: float = 60.0, viewer: bool = False) -> Orthanc:
    """Orthanc with its DICOMweb plugin at ``/dicom-web/`` on loopback (``http_port``, else a free
    one), storage under ``workdir`` (a restart on the same folder keeps what it holds). ``users``:
    HTTP basic-auth users (name -> password); then every request needs one. No DICOM peers.
    ``viewer``: full study and series metadata and WADO-URI, as a web viewer (OHIF) reads them."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_tcp_port(), http_port or free_tcp_port()
    config = {
        "Name": "dicomweb-archive",
        "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
        "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": viewer, "WadoRoot": "/wado", "Ssl": False,
                     "StudiesMetadata": "Full" if viewer else "MainDicomTags",
                     "SeriesMetadata": "Full" if viewer else "MainDicomTags"},
        "SaveJobs": False, "StableAge": 1,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    process, log_path, handle = _spawn("orthanc", ["Orthanc", str(config_path)], workdir)
    orthanc = Orthanc("orthanc", process, "ORTHANC", dicom_port, workdir, log_path, handle, http_port=http_port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and orthanc.alive():
        try:
            with socket.create_connection((HOST, http_port), timeout=1.0):
                return orthanc
        except OSError:
            time.sleep(0.2)
    orthanc.stop()
    raise RuntimeError(f"Orthanc with DICOMweb did not start within {timeout_s} s; log:\n{orthanc.log_text()[-3000:]}")


@dataclass
class RayHead:
    """A Ray head node (``ray start --head --block``) in its own process group; ``env`` holds what a
    driver needs to join it (the cluster's auth token) and ``address`` where."""

    process: subprocess.Popen
    address: str
    env: dict[str, str]
    log_path: Path
    _log: IO = field(repr=False)

    def stop(self, timeout_s: float = 20.0) -> None:
        """End the head and every process it started (its process group: GCS, raylet, workers)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=timeout_s)
                time.sleep(0.5)  # the group's other members end after their parent
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


def start_ray_head(workdir: Path, num_cpus: int = 2, timeout_s: float = 90.0) -> RayHead:
    """A local Ray cluster of one node with ``num_cpus`` CPUs, no dashboard, a small object store and
    a token of its own (Ray 2.60 enables token authentication); joined with ``--address``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_tcp_port()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex(), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(PROJECT_ROOT)}
    ray = str(Path(sys.executable).with_name("ray"))
    process, log_path, handle = _spawn("ray-head", [
        ray, "start", "--head", "--block", "--port", str(port), "--num-cpus", str(num_cpus),
        "--include-dashboard", "false", "--object-store-memory", str(150 * 1024 * 1024), "--disable-usage-stats"],
        workdir, env=env)
    head = RayHead(process, f"127.0.0.1:{port}", env, log_path, handle)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        handle.flush()
        if "Ray runtime started" in log_path.read_text(errors="replace"):
            return head
        time.sleep(0.5)
    head.stop()
    raise RuntimeError(f"ray start --head did not start within {timeout_s} s; log:\n"
                       f"{log_path.read_text(errors='replace')[-3000:]}")
