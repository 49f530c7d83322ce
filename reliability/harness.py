"""Real peers and bookkeeping for the reliability tests and the soak run.

Everything runs on 127.0.0.1 on ports the OS hands out, and every process started here is
its own process group (``start_new_session``), so :meth:`Proc.kill_group` can SIGKILL a node
together with its worker processes, exactly as a crash or an OOM kill of a container would.

* :func:`start_node`: ``python -m app serve`` with a generated site file;
  :meth:`NodeProc.restart` starts it again on the same port, folders and database;
* :func:`start_archive`: the project's archive (``python -m app.node.archive``) as PACS, with a
  journal line per reception (so duplicates are counted, not overwritten) and an optional
  delay per C-STORE (a slow PACS, to kill the node while it sends);
  :func:`node_with_archive`: both, the archive as the node's destination;
* :func:`make_study`: a small synthetic lumbar study, padded with extra series to a minimum
  instance count;
* :func:`send_concurrently`: several associations at once (each a
  :mod:`reliability.scu` process), opened before any of them sends (one association from this
  process: :func:`reliability.scu.send_files`);
* :func:`account`: for a set of studies, what was acknowledged, is on disk, was analysed and
  arrived at the archive (and how often).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import pydicom
import yaml
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid

from app.config import PROJECT_ROOT
from app.node.audit import read_audit
from app.node.net import free_tcp_port, wait_for_echo
from app.node.state import StateStore
from reliability.scu import HOST, NODE_AE, send_files

#: The node admits its health-check AE title from loopback whatever its allow-list says.
PROBE_AE = "HEALTHCHECK"
#: SOP classes of the results, to count result sets at the archive.
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SR_STORAGE = frozenset({"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33",
                        "1.2.840.10008.5.1.4.1.1.88.22"})  # Comprehensive 3D, Comprehensive, Enhanced SR


def find_model() -> Path | None:
    """The model bundle the node should use ($PARASPINAL_TEST_MODEL, models/paraspinal_t2ax, models/)."""
    from paraspinal.model_bundle import BundleError, find_bundle

    for candidate in filter(None, [os.environ.get("PARASPINAL_TEST_MODEL"), PROJECT_ROOT / "models" / "paraspinal_t2ax",
                                   PROJECT_ROOT / "models"]):
        try:
            return find_bundle(Path(candidate))
        except BundleError:
            continue
    return None


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25,
               alive: Callable[[], bool] | None = None) -> Any:
    """Poll ``predicate`` until it returns something true; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise RuntimeError(f"process ended while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)


# ---- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    """A started process (its own process group) with its output in ``log_path``."""

    name: str
    process: subprocess.Popen
    workdir: Path
    log_path: Path
    port: int
    ae_title: str
    _log: IO = field(repr=False)
    log_offset: int = 0  # where this run's output starts in the (appended) log file

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL of the group after ``timeout_s``; returns the exit status."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_group()
        self._close()
        return self.process.returncode

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the process and every child it started)."""
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.process.wait(timeout=30)
            self._wait_group_gone()
            self._close()

    def _wait_group_gone(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def _close(self) -> None:
        if not self._log.closed:
            self._log.close()

    def log_text(self, this_run_only: bool = False) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_bytes()
        return (text[self.log_offset:] if this_run_only else text).decode("utf-8", "replace")


def _spawn(name: str, args: Sequence[str], workdir: Path, env: dict[str, str] | None = None,
           preexec: Callable[[], None] | None = None) -> tuple[subprocess.Popen, Path, IO, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    handle = open(log_path, "ab")
    offset = handle.tell()
    process = subprocess.Popen(list(args), stdout=handle, stderr=subprocess.STDOUT, cwd=workdir,
                               env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})},
                               start_new_session=True, preexec_fn=preexec)
    return process, log_path, handle, offset


# ---- the node ---------------------------------------------------------------------------------


def node_config(workdir: Path, port: int, **overrides: Any) -> dict:
    """A complete node section for a test: loopback, its folders under ``workdir``, short timings."""
    node = {
        "ae_title": NODE_AE, "bind_address": HOST, "port": port, "allowed_peers": [],
        "max_associations": 16, "acse_timeout_s": 10, "dimse_timeout_s": 30, "network_timeout_s": 30,
        "quiet_period_s": 1.0,
        "spool_dir": str(workdir / "spool"), "state_db": str(workdir / "state.sqlite3"),
        "results_dir": str(workdir / "results"), "failed_dir": str(workdir / "failed"),
        "audit_log": str(workdir / "audit.jsonl"),
        "workers": 1, "min_free_disk_mb": 10, "destinations": [],
        "send_retries": 3, "send_backoff_s": 0.2, "send_backoff_max_s": 1.0,
        "shutdown_grace_s": 5.0,
    }
    node.update(overrides)
    return {"node": node}


@dataclass
class NodeProc(Proc):
    config_path: Path = Path()
    model: Path = Path()
    runs: int = 1

    @property
    def settings(self) -> dict:
        return yaml.safe_load(self.config_path.read_text())["node"]

    def state(self) -> StateStore:
        return StateStore(Path(self.settings["state_db"]), readonly=True)

    def study(self, study_uid: str) -> dict | None:
        state = self.state()
        try:
            return state.study(study_uid)
        finally:
            state.close()

    def outbox(self, study_uid: str) -> list[dict]:
        state = self.state()
        try:
            return state.outbox_rows(study_uid)
        finally:
            state.close()

    def summary(self) -> dict:
        state = self.state()
        try:
            return state.summary(recent=1000)
        finally:
            state.close()

    def delivered(self, study_uid: str) -> bool:
        """The study is done and every current outbox item is sent."""
        row = self.study(study_uid)
        if not row or row["status"] != "done":
            return False
        current = [r for r in self.outbox(study_uid) if r["status"] != "superseded"]
        return bool(current) and all(r["status"] == "sent" for r in current)

    def wait_delivered(self, study_uid: str, timeout_s: float = 240.0) -> None:
        """Until :meth:`delivered`; fails at once (with the reason) if the study failed."""
        def check() -> bool:
            row = self.study(study_uid)
            if row and row["status"] == "failed":
                raise AssertionError(f"study {study_uid} failed: {row['reason']}")
            return self.delivered(study_uid)

        wait_until(check, timeout_s, f"study {study_uid} delivered", interval_s=0.5, alive=self.alive)

    def restart(self, timeout_s: float = 120.0, wait_ready: bool = True,
                env: dict[str, str] | None = None) -> "NodeProc":
        """Start the node again with the same configuration, port, folders and database
        (``env``: e.g. ``PARASPINAL__NODE__...`` overrides for this run only)."""
        if self.alive():
            raise RuntimeError("the node is still running")
        node = _launch_node(self.workdir, self.config_path, self.model, self.port, timeout_s, wait_ready, env)
        node.runs = self.runs + 1
        return node

    def events(self, name: str, this_run_only: bool = False) -> list[str]:
        return [line for line in self.log_text(this_run_only).splitlines() if f"event={name} " in line + " "]

    def wait_ready(self, timeout_s: float = 120.0) -> "NodeProc":
        """Until a worker process of this run has loaded the model (``worker_ready``)."""
        wait_until(lambda: self.events("worker_ready", this_run_only=True), timeout_s, "a worker process ready",
                   alive=self.alive)
        return self


def _launch_node(workdir: Path, config_path: Path, model: Path, port: int, timeout_s: float,
                 wait_ready: bool, env: dict[str, str] | None = None) -> NodeProc:
    process, log_path, handle, offset = _spawn("node", [
        sys.executable, "-m", "app", "--config", str(config_path), "serve", "--model", str(model)], workdir, env)
    node = NodeProc("node", process, workdir, log_path, port, NODE_AE, handle, offset, config_path=config_path,
                    model=model)
    if not wait_for_echo(HOST, port, NODE_AE, timeout_s, calling_ae=PROBE_AE, alive=node.alive):
        node.kill_group()
        raise RuntimeError(f"the node did not answer C-ECHO within {timeout_s} s:\n{node.log_text()[-3000:]}")
    return node.wait_ready(timeout_s) if wait_ready else node


def start_node(workdir: Path, model: Path, port: int | None = None, timeout_s: float = 120.0,
               wait_ready: bool = True, env: dict[str, str] | None = None, **overrides: Any) -> NodeProc:
    """``python -m app serve`` with :func:`node_config` (plus ``overrides``) in ``workdir/node.yaml``.
    Returns once it answers C-ECHO and (``wait_ready``) a worker has loaded the model."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_tcp_port()
    config_path = workdir / "node.yaml"
    config_path.write_text(yaml.safe_dump(node_config(workdir, port, **overrides), sort_keys=False))
    return _launch_node(workdir, config_path, model, port, timeout_s, wait_ready, env)


def node_status(node: NodeProc, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """``python -m app --config <node.yaml> status ARGS``."""
    return subprocess.run([sys.executable, "-m", "app", "--config", str(node.config_path), "status", *args],
                          capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT_ROOT,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


# ---- the archive (PACS) -----------------------------------------------------------------------


@dataclass
class ArchiveProc(Proc):
    journal: Path = Path()

    def receipts(self) -> list[dict]:
        """One entry per C-STORE the archive answered with success, in order."""
        if not self.journal.is_file():
            return []
        out = []
        for line in self.journal.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def start_archive(workdir: Path, ae_title: str = "ARCHIVE", port: int | None = None, store_delay_s: float = 0.0,
                  timeout_s: float = 30.0) -> ArchiveProc:
    """The project's archive as PACS on a free loopback port, journalling every reception."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_tcp_port()
    journal = workdir / "journal.jsonl"
    process, log_path, handle, offset = _spawn("archive", [
        sys.executable, "-m", "app.node.archive", "--dir", str(workdir / "files"), "--ae-title", ae_title,
        "--bind", HOST, "--port", str(port), "--journal", str(journal), "--store-delay", str(store_delay_s)], workdir)
    archive = ArchiveProc("archive", process, workdir, log_path, port, ae_title, handle, offset, journal=journal)
    if not wait_for_echo(HOST, port, ae_title, timeout_s, alive=archive.alive):
        archive.kill_group()
        raise RuntimeError(f"the archive did not start:\n{archive.log_text()[-2000:]}")
    return archive


@dataclass
class Rig:
    """A node whose destination is an archive, as the tests and the soak run use them.
    ``node`` is the running node (:meth:`restart` replaces it)."""

    node: NodeProc
    archive: ArchiveProc

    def restart(self, **kwargs: Any) -> NodeProc:
        self.node = self.node.restart(**kwargs)
        return self.node


@contextlib.contextmanager
def node_with_archive(root: Path, model: Path, store_delay_s: float = 0.0, wait_ready: bool = True,
                      env: dict[str, str] | None = None, **overrides: Any) -> Iterator[Rig]:
    """The archive (``root/archive``, ``store_delay_s`` s per C-STORE) and a node (``root/node``,
    :func:`node_config` plus ``overrides``) sending its results there; both stopped at the end."""
    archive = start_archive(root / "archive", store_delay_s=store_delay_s)
    rig = None
    try:
        node = start_node(root / "node", model, wait_ready=wait_ready, env=env,
                          destinations=[{"ae_title": archive.ae_title, "host": HOST, "port": archive.port}],
                          **overrides)
        rig = Rig(node, archive)
        yield rig
    finally:
        if rig is not None:
            rig.node.stop()
        archive.stop()


# ---- studies and sending ----------------------------------------------------------------------


@dataclass
class StudyFiles:
    """The files of one study to send, and their SOP Instance UIDs."""

    study_uid: str
    paths: list[Path]
    sops: dict[Path, str]


def make_study(root: Path, seed: int, n_slices: int = 5, min_instances: int = 0, rows: int = 64) -> StudyFiles:
    """A synthetic lumbar study (axial T2 of ``n_slices`` + localizer, sagittal T2, axial T1), with
    copies of the sagittal series (new Series/SOP Instance UIDs) added until it has at least
    ``min_instances`` instances; small images (``rows`` square, 240 mm field of view)."""
    from paraspinal.synthetic_study import make_synthetic_study

    spacing = 240.0 / rows
    study = make_synthetic_study(root, seed=seed, rows=rows, cols=rows, pixel_spacing=(spacing, spacing),
                                 n_slices=n_slices)
    paths = list(study.all_paths)
    sagittal = list(study.distractor_paths.get("sagittal_t2", [])) or list(study.t2_paths)
    copy = 0
    while len(paths) < min_instances:
        copy += 1
        series_uid = generate_uid()
        folder = root / f"extra_{copy}"
        folder.mkdir(parents=True, exist_ok=True)
        for source in sagittal:
            if len(paths) >= min_instances:
                break
            ds = pydicom.dcmread(source)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = 100 + copy
            ds.SeriesDescription = f"t2_tse_sag copy {copy}"
            target = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(target, enforce_file_format=True)
            paths.append(target)
    sops = {p: str(read_file_meta_info(p).MediaStorageSOPInstanceUID) for p in paths}
    return StudyFiles(study.study_uid, paths, sops)


def _rle_run(n_bytes: int, value: int) -> bytes:
    """PackBits (DICOM RLE, PS3.5 G.3.1) encoding of ``n_bytes`` copies of ``value``."""
    out = bytearray()
    while n_bytes > 0:
        n = min(n_bytes, 128)
        out += bytes([0, value]) if n == 1 else bytes([257 - n, value])  # literal of 1, or replicate n
        n_bytes -= n
    return bytes(out)


def rle_overflow_frame(rows: int, cols: int) -> bytes:
    """A 16-bit RLE frame whose first segment (the high bytes) decodes to 2 bytes more than
    ``rows * cols``, as segment offsets pointing past a segment's real end would make it.
    pylibjpeg-rle (Rust) writes past its output buffer's end and panics ("index out of
    bounds"): pyo3's PanicException, which derives from BaseException, not Exception."""
    import struct

    high = _rle_run(rows * cols + 2, 0)
    low = _rle_run(rows * cols, 0)
    header = struct.pack("<16I", 2, 64, 64 + len(high), *([0] * 13))
    frame = header + high + low
    return frame + (b"\0" if len(frame) % 2 else b"")


def make_codec_crash_study(root: Path, seed: int = 1) -> StudyFiles:
    """A 3-slice RLE axial T2 (32 x 32, 16 bits) whose first slice holds
    :func:`rle_overflow_frame`: valid DICOM (the node acknowledges it) whose pixel data make
    the RLE decoder panic. (The fuzzer found the panic; this is its minimal form.)"""
    from pydicom.encaps import encapsulate

    from paraspinal.synthetic_study import make_synthetic_study

    study = make_synthetic_study(root, seed=seed, rows=32, cols=32, pixel_spacing=(7.5, 7.5), n_slices=3,
                                 include_distractors=False, transfer_syntax="rle")
    path = study.t2_paths[0]
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([rle_overflow_frame(int(ds.Rows), int(ds.Columns))])
    ds.save_as(path)
    paths = list(study.all_paths)
    return StudyFiles(study.study_uid, paths, {p: str(read_file_meta_info(p).MediaStorageSOPInstanceUID)
                                               for p in paths})


def send_concurrently(jobs: Sequence[tuple[str, Sequence[Path]]], port: int,
                      timeout_s: float = 300.0) -> dict[Path, int | None]:
    """One association per (calling AE, paths) job, each from its own SCU process
    (:mod:`reliability.scu`), all established before any of them sends; returns the status
    of every file (None: no response)."""
    procs = []
    for calling_ae, paths in jobs:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "reliability.scu", "--port", str(port), "--calling-ae", calling_ae, "--wait",
             *map(str, paths)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}))
    out: dict[Path, int | None] = {p: None for _, paths in jobs for p in paths}
    try:
        for proc in procs:  # every association open ...
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"an SCU could not associate: {line!r}")
        for proc in procs:  # ... then all send at once
            proc.stdin.write("go\n")
            proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            remaining = max(1.0, deadline - time.monotonic())
            stdout, _ = proc.communicate(timeout=remaining)
            for line in stdout.splitlines():
                if line.startswith("{"):
                    item = json.loads(line)
                    out[Path(item["path"])] = item["status"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def max_overlap(audit_events: list[dict], calling_aes: set[str]) -> int:
    """Most associations (of ``calling_aes``) open at the same moment, from the node's audit log."""
    from datetime import datetime

    def t(text: str) -> float:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()

    edges = []
    for e in audit_events:
        if e.get("event") == "association" and e.get("calling_ae") in calling_aes:
            edges += [(t(e["started"]), 1), (t(e["ended"]), -1)]
    best = open_now = 0
    for _, step in sorted(edges, key=lambda x: (x[0], x[1])):
        open_now += step
        best = max(best, open_now)
    return best


# ---- accounting -------------------------------------------------------------------------------


@dataclass
class StudyAccount:
    study_uid: str
    sent: int = 0                 # instances we tried to send (distinct)
    acknowledged: int = 0         # distinct instances the node answered with success
    stored: int = 0               # acknowledged instances whose file is in the spool
    analysed: int = 0             # instances the final analysis saw (result.json), 0 if none
    outputs: int = 0              # result objects of the final analysis
    delivered: int = 0            # of those, how many arrived at the archive
    receptions: int = 0           # C-STOREs of this study's results the archive answered
    duplicates: int = 0           # re-sent instances: receptions beyond the first of a SOP Instance UID
                                  # (same UID, same bytes: idempotent at the PACS)
    changed_duplicates: int = 0   # a SOP Instance UID received with other bytes (must be 0)
    foreign: int = 0              # received objects not among the final outputs (a second set)
    seg_uids: int = 0             # distinct SEG SOP Instance UIDs received
    sr_uids: int = 0              # distinct SR SOP Instance UIDs received
    srs_per_set: int = 1          # SRs one analysis writes (the report and the outlines-only viewer SR)
    status: str = ""

    @property
    def result_sets(self) -> int:
        """Distinct result sets the archive holds for the study: every analysis writes the same
        number of SRs (``srs_per_set``), so distinct SR UIDs over that; objects outside the final
        set count as a further set."""
        sets = -(-self.sr_uids // max(1, self.srs_per_set))
        return sets + (1 if self.foreign and sets <= 1 else 0)

    @property
    def duplicate_result_sets(self) -> int:
        """Result sets beyond the one expected (must be 0; a re-sent instance is not one)."""
        return max(0, self.result_sets - 1)

    @property
    def lost(self) -> int:
        return (self.acknowledged - self.stored) + max(0, self.acknowledged - self.analysed) + \
            (self.outputs - self.delivered)


def account(node: NodeProc, archive: ArchiveProc | None, studies: Sequence[StudyFiles],
            acknowledged: dict[Path, int | None]) -> list[StudyAccount]:
    """What happened to each study's instances and results (see :class:`StudyAccount`)."""
    settings = node.settings
    spool, results = Path(settings["spool_dir"]), Path(settings["results_dir"])
    receipts = archive.receipts() if archive is not None else []
    by_sop: dict[str, list[dict]] = defaultdict(list)
    for r in receipts:
        by_sop[r["sop"]].append(r)
    out = []
    for study in studies:
        a = StudyAccount(study.study_uid)
        acked = {study.sops[p] for p in study.paths if acknowledged.get(p) == 0}
        a.sent = len(set(study.sops.values()))
        a.acknowledged = len(acked)
        on_disk = {p.stem for p in (spool / study.study_uid).glob("*/*.dcm")}
        a.stored = len(acked & on_disk)
        result_json = results / study.study_uid / "result.json"
        if result_json.is_file():
            result = json.loads(result_json.read_text())
            seen = sum(int(d.get("instances", 0)) for d in result.get("series_decisions", []))
            unseen = len(on_disk) - seen + len(result.get("skipped_files") or [])
            # every spooled file was indexed and judged: every acknowledged one was analysed
            a.analysed = max(0, a.stored - max(0, unseen))
            metas = [read_file_meta_info(p) for p in (results / study.study_uid).glob("*.dcm")]
            expected = {str(m.MediaStorageSOPInstanceUID) for m in metas}
            a.srs_per_set = max(1, sum(str(m.MediaStorageSOPClassUID) in SR_STORAGE for m in metas))
        else:
            expected = set()
        row = node.study(study.study_uid)
        a.status = row["status"] if row else "unknown"
        a.outputs = len(expected)
        mine = [r for r in receipts if r["study"] == study.study_uid]
        a.receptions = len(mine)
        a.delivered = len(expected & {r["sop"] for r in mine})
        counts = Counter(r["sop"] for r in mine)
        a.duplicates = sum(n - 1 for n in counts.values())
        a.changed_duplicates = sum(1 for sop in counts if len({r["sha256"] for r in by_sop[sop]}) > 1)
        a.foreign = len(set(counts) - expected)
        a.seg_uids = len({r["sop"] for r in mine if r.get("sop_class") == SEG_STORAGE})
        a.sr_uids = len({r["sop"] for r in mine if r.get("sop_class") in SR_STORAGE})
        out.append(a)
    return out


def format_accounts(accounts: Sequence[StudyAccount]) -> str:
    """One line per study: instances in, results out, result sets and re-sent instances."""
    head = (f"{'study (hash)':<18} {'sent':>5} {'acked':>5} {'stored':>6} {'analysed':>8} {'outputs':>7} "
            f"{'delivered':>9} {'receptions':>10} {'sets':>4} {'dup sets':>8} {'re-sent':>7} {'foreign':>7} "
            f"{'lost':>4}  status")
    from app.node.logs import uid_hash

    lines = [head]
    for a in accounts:
        lines.append(f"{uid_hash(a.study_uid):<18} {a.sent:>5} {a.acknowledged:>5} {a.stored:>6} {a.analysed:>8} "
                     f"{a.outputs:>7} {a.delivered:>9} {a.receptions:>10} {a.result_sets:>4} "
                     f"{a.duplicate_result_sets:>8} {a.duplicates:>7} {a.foreign:>7} {a.lost:>4}  {a.status}")
    lines.append("(sets: distinct result sets at the archive, must be 1; re-sent: the same SOP Instance UID again "
                 "with the same bytes, idempotent at a PACS)")
    return "\n".join(lines)


# ---- scenarios (shared by the tests and the soak run) ---------------------------------------


@dataclass
class LoadRun:
    """What :func:`load_run` did."""

    accounts: list[StudyAccount]
    statuses: dict[Path, int | None]  # every file sent: its C-STORE status (None: no response)
    overlap: int                      # most of the 8 associations open at the same moment (audit trail)


def load_run(root: Path, model: Path, n_studies: int, seed: int, quiet_period_s: float = 2.0,
             timeout_s: float = 600.0) -> LoadRun:
    """``n_studies`` studies of 32 instances, every study spread over 8 associations from 8 SCU
    processes, all open before any sends, to a node with 2 workers whose results go to an
    archive; returns once every study is delivered (raises otherwise)."""
    with node_with_archive(root, model, quiet_period_s=quiet_period_s, workers=2, max_associations=12,
                           wait_ready=False) as rig:
        # The studies are made while the node's workers load the model.
        studies = [make_study(root / f"study{i}", seed=seed + i, n_slices=5, min_instances=32)
                   for i in range(n_studies)]
        files = [p for s in studies for p in s.paths]
        jobs = [(f"LOAD{k}", files[k::8]) for k in range(8)]
        statuses = send_concurrently(jobs, rig.node.port, timeout_s=timeout_s)
        for study in studies:
            rig.node.wait_delivered(study.study_uid, timeout_s)
        accounts = account(rig.node, rig.archive, studies, statuses)
        overlap = max_overlap(read_audit(root / "node" / "audit.jsonl"), {ae for ae, _ in jobs})
    return LoadRun(accounts, statuses, overlap)


@dataclass
class CrashCycle:
    """What :func:`crash_cycle` did."""

    node: NodeProc                      # the node running after the last restart
    studies: list[StudyFiles]
    acknowledged: set[Path]
    kills: int
    partial_acks: int                   # instances of Y acknowledged before the first kill
    delivered_before_second_kill: int   # X's results at the archive when the second kill came


def crash_cycle(node: NodeProc, archive: ArchiveProc, root: Path, seed: int, timeout_s: float = 240.0,
                kill_after_acks: int = 10) -> CrashCycle:
    """Two SIGKILLs of the node's process group, then delivery of everything.

    1. Study X is sent; once its analysis runs, study Y is sent and the node is killed after
       ``kill_after_acks`` acknowledgements of Y (so: during reception and during analysis).
       The node restarts and Y is sent again whole, as a PACS retrying would.
    2. Once X's first result reached the archive (``archive`` should answer slowly), the node
       is killed again (during sending) and restarted.

    Returns once both studies are done and delivered (raises otherwise).
    """
    x = make_study(root / f"x{seed}", seed=seed, n_slices=6)
    y = make_study(root / f"y{seed}", seed=seed + 1, n_slices=5, min_instances=30)
    acknowledged: set[Path] = set()
    acknowledged |= {p for p, s in send_files(x.paths, node.port, f"SCU_X{seed % 1000}") if s == 0}
    wait_until(lambda: (node.study(x.study_uid) or {}).get("status") == "processing", timeout_s,
               "X being analysed", interval_s=0.1, alive=node.alive)
    acks: list[int | None] = []

    def on_ack(path: Path, status: int | None) -> None:
        acks.append(status)
        if len(acks) == kill_after_acks:
            node.kill_group(signal.SIGKILL)

    first = send_files(y.paths, node.port, f"SCU_Y{seed % 1000}", on_ack=on_ack)
    if node.alive():
        raise RuntimeError("the node outlived its first kill")
    partial = sum(1 for _, s in first if s == 0)
    acknowledged |= {p for p, s in first if s == 0}
    node = node.restart(wait_ready=False)
    acknowledged |= {p for p, s in send_files(y.paths, node.port, f"SCU_Y{seed % 1000}") if s == 0}
    wait_until(lambda: [r for r in archive.receipts() if r["study"] == x.study_uid], timeout_s,
               "X's first result at the archive", interval_s=0.05, alive=node.alive)
    at_kill = len({r["sop"] for r in archive.receipts() if r["study"] == x.study_uid})
    node.kill_group(signal.SIGKILL)
    node = node.restart(wait_ready=False)
    for study in (x, y):
        node.wait_delivered(study.study_uid, timeout_s)
    return CrashCycle(node, [x, y], acknowledged, 2, partial, at_kill)
