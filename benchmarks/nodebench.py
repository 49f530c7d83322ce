"""The real node under load: end-to-end latency, ingest against DCMTK storescp, concurrent senders, memory.

Everything here talks to separate processes over DICOM on loopback, exactly as a PACS would:

* the node: ``python -m app --config <bench>/node.yaml serve`` (its own source tree, so an
  older tree can be measured beside the current one), its log parsed for events;
* the PACS: the project's archive (``python -m app.node.archive``);
* the senders: pynetdicom in this process (e2e, concurrency: the time of each C-STORE
  response is known) and DCMTK ``storescu`` (ingest).

Times are wall-clock seconds on this machine (the node's log lines carry UTC milliseconds).
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from benchmarks.data import BenchStudy, clone_study
from benchmarks.machine import ROOT, load_average

HOST = "127.0.0.1"
NODE_AE = "BENCHNODE"
PACS_AE = "BENCHPACS"
SCU_AE = "BENCHSCU"
SCP_AE = "BENCHSCP"

#: result.json stages, in pipeline order ("select" there includes "load"; reported without it).
STAGES = ("load", "select", "preprocess", "inference", "quantification", "seg_encode", "sr_encode", "report")


# ---- processes and memory ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    children, out, todo = _children_map(), [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


class MemorySampler:
    """Samples the resident memory (VmRSS) of a process and all its descendants every ``interval_s``.

    ``peak_total_mib``: the largest sum over the tree seen since :meth:`reset`; ``peak_by_pid``:
    each process's own peak (VmHWM, the kernel's exact high-water mark) with its command line;
    ``cpu_s``: CPU seconds (user + system) the tree used since :meth:`reset`, a figure that does not
    depend on how busy the machine is the way wall time does.
    """

    def __init__(self, root_pid: int, interval_s: float = 0.05) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.reset()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.peak_total_kib = 0
            self.peak_at = 0.0
            self.samples = 0
            self.seen: dict[int, str] = {}
            self.cpu_start = {pid: _cpu_seconds(pid) for pid in process_tree(self.root_pid)} \
                if hasattr(self, "root_pid") else {}
            self.cpu_last: dict[int, float] = dict(self.cpu_start)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            pids = process_tree(self.root_pid)
            total = sum(_status_kib(pid, "VmRSS") for pid in pids)
            cpu = {pid: _cpu_seconds(pid) for pid in pids}
            with self._lock:
                self.samples += 1
                self.cpu_last.update(cpu)
                for pid in pids:
                    if pid not in self.seen:
                        self.seen[pid] = _cmdline(pid)
                if total > self.peak_total_kib:
                    self.peak_total_kib, self.peak_at = total, time.time()

    def snapshot(self) -> dict:
        with self._lock:
            per_pid = [{"pid": pid, "vm_hwm_mib": round(_status_kib(pid, "VmHWM") / 1024, 1),
                        "vm_rss_mib": round(_status_kib(pid, "VmRSS") / 1024, 1), "cmd": cmd[:120]}
                       for pid, cmd in self.seen.items()]
            cpu = {pid: _cpu_seconds(pid) or self.cpu_last.get(pid, 0.0) for pid in self.cpu_last}
            cpu_s = sum(max(0.0, cpu[pid] - self.cpu_start.get(pid, 0.0)) for pid in cpu)
            return {"peak_total_rss_mib": round(self.peak_total_kib / 1024, 1), "samples": self.samples,
                    "interval_s": self.interval_s, "cpu_s": round(cpu_s, 2), "processes": per_pid}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# ---- the node's log ----------------------------------------------------------------------------

_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_log_line(line: str) -> dict:
    """One ``key=value`` log line as a dict; ``ts`` becomes ``t`` (Unix seconds)."""
    fields = {}
    for key, value in _PAIR.findall(line):
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        fields[key] = value
    ts = fields.get("ts", "")
    match = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z$", ts)
    if match:
        y, mo, d, h, mi, s, frac = match.groups()
        fields["t"] = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s))) + float(f"0.{frac or 0}")
    return fields


class LogTail:
    """Reads a growing log file; keeps the parsed event lines (those with ``event=``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = ""
        self.events: list[dict] = []

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "r", errors="replace") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
                self._offset = handle.tell()
        except FileNotFoundError:
            return []
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        new = [parse_log_line(line) for line in lines if " event=" in line]
        self.events.extend(new)
        return new

    def find(self, event: str, study_uid: str | None = None) -> list[dict]:
        keys = _uid_keys(study_uid) if study_uid else None
        return [e for e in self.events if e.get("event") == event and (keys is None or e.get("study") in keys)]


def _uid_keys(uid: str) -> set[str]:
    """How a UID may appear in the node's log: as is, or hashed (``node.log_uids: hashed``)."""
    return {uid, "uid:" + hashlib.sha256(uid.encode()).hexdigest()[:16]}


# ---- DICOM peers ---------------------------------------------------------------------------

def echo_ok(port: int, called_ae: str, calling_ae: str = SCU_AE) -> bool:
    """C-ECHO succeeds (quietly False while the peer is not listening yet)."""
    import logging

    from pynetdicom import AE

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate(HOST, port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return rsp is not None and int(rsp.get("Status", -1)) == 0
    finally:
        assoc.release()


def send_study(paths: Sequence[Path], port: int, called_ae: str = NODE_AE, calling_ae: str = SCU_AE) -> dict:
    """C-STORE ``paths`` over one association; the time of the first request and of the last response."""
    import logging

    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    contexts = set()
    for path in paths:
        meta = read_file_meta_info(path)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, syntax in sorted(contexts):
        syntaxes = list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        ae.add_requested_context(sop_class, syntaxes)
    t_start = time.time()
    assoc = ae.associate(HOST, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {called_ae}@{HOST}:{port}")
    statuses, t_last_ack = [], t_start
    try:
        for path in paths:
            rsp = assoc.send_c_store(path)
            t_last_ack = time.time()
            statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
    finally:
        assoc.release()
    bad = [s for s in statuses if s != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(statuses)} instances not stored "
                           f"(statuses {sorted(set(map(str, bad)))})")
    return {"t_start": t_start, "t_last_ack": t_last_ack, "t_released": time.time(), "instances": len(paths),
            "bytes": sum(Path(p).stat().st_size for p in paths)}


@dataclass
class NodeUnderTest:
    """Archive (the PACS) + node, started from ``tree`` with a site file in ``workdir``."""

    workdir: Path
    model: Path
    tree: Path = ROOT
    device: str | None = None
    quiet_period_s: float = 1.0
    workers: int = 1
    threads: int | None = None  # torch/OpenMP and ITK threads of the node's workers (None: their defaults)
    archive: subprocess.Popen | None = None
    node: subprocess.Popen | None = None
    node_port: int = 0
    archive_port: int = 0
    log: LogTail | None = None
    memory: MemorySampler | None = None
    started_s: float = 0.0
    _handles: list = field(default_factory=list)

    @property
    def results_dir(self) -> Path:
        return self.workdir / "node" / "results"

    @property
    def archive_dir(self) -> Path:
        return self.workdir / "archive"

    def _config(self) -> Path:
        node_dir = self.workdir / "node"
        # Only keys every version of the node knows, so an older tree runs with the same file.
        site = {"node": {
            "ae_title": NODE_AE, "bind_address": HOST, "port": self.node_port,
            "allowed_peers": [{"ae_title": SCU_AE, "host": HOST}],
            "quiet_period_s": self.quiet_period_s,
            "spool_dir": str(node_dir / "spool"), "state_db": str(node_dir / "state.sqlite3"),
            "results_dir": str(node_dir / "results"), "failed_dir": str(node_dir / "failed"),
            "workers": self.workers, "min_free_disk_mb": 50,
            "destinations": [{"ae_title": PACS_AE, "host": HOST, "port": self.archive_port}],
            "send_retries": 3, "send_backoff_s": 1.0, "send_backoff_max_s": 5.0,
        }}
        path = self.workdir / "node.yaml"
        path.write_text(yaml.safe_dump(site, sort_keys=False))
        return path

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        handle = open(self.workdir / "logs" / log_name, "wb")
        self._handles.append(handle)
        env = dict(os.environ, PYTHONPATH=str(self.tree), PYTHONUNBUFFERED="1")
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                       ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(self.threads))
        return subprocess.Popen([sys.executable, *args], stdout=handle, stderr=subprocess.STDOUT, cwd=self.workdir,
                                env=env, start_new_session=True)

    def start(self, timeout_s: float = 600.0) -> "NodeUnderTest":
        self.workdir, self.model, self.tree = (Path(self.workdir).resolve(), Path(self.model).resolve(),
                                               Path(self.tree).resolve())
        shutil.rmtree(self.workdir, ignore_errors=True)
        (self.workdir / "logs").mkdir(parents=True)
        self.node_port, self.archive_port = free_port(), free_port()
        config = self._config()
        t0 = time.time()
        self.archive = self._spawn(["-m", "app.node.archive", "--dir", str(self.archive_dir), "--port",
                                    str(self.archive_port), "--ae-title", PACS_AE], "archive.log")
        args = ["-m", "app", "--config", str(config), "serve", "--model", str(self.model)]
        if self.device:
            args += ["--device", self.device]
        self.node = self._spawn(args, "node.log")
        self.log = LogTail(self.workdir / "logs" / "node.log")
        self.memory = MemorySampler(self.node.pid)
        deadline = time.time() + timeout_s
        ready = set()
        while time.time() < deadline:
            for proc, name in ((self.node, "node"), (self.archive, "archive")):
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} stopped while starting (see {self.workdir / 'logs'})")
            self.log.poll()
            if "archive" not in ready and echo_ok(self.archive_port, PACS_AE):
                ready.add("archive")
            if "node" not in ready and self.log.find("listener_started") and echo_ok(self.node_port, NODE_AE):
                ready.add("node")
            if "workers" not in ready and len(self.log.find("worker_ready")) >= self.workers:
                ready.add("workers")
            if ready == {"archive", "node", "workers"}:
                self.started_s = round(time.time() - t0, 2)
                return self
            time.sleep(0.2)
        raise RuntimeError(f"node not ready after {timeout_s:.0f} s (see {self.workdir / 'logs'})")

    def wait_results(self, study_uid: str, after: float, timeout_s: float = 900.0) -> dict:
        """Until every object of the study's analysis is acknowledged by the archive; the events."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.node is not None and self.node.poll() is not None:
                raise RuntimeError("the node stopped")
            self.log.poll()
            for bad in ("analysis_failed", "analysis_timeout"):
                if [e for e in self.log.find(bad, study_uid) if e.get("t", 0) >= after - 1]:
                    raise RuntimeError(f"{bad} for study {study_uid} (see {self.workdir / 'logs'})")
            done = [e for e in self.log.find("analysis_done", study_uid) if e.get("t", 0) >= after - 1]
            if done:
                wanted = int(done[-1].get("objects", "0"))
                sent = [e for e in self.log.find("result_sent", study_uid) if e["t"] >= done[-1]["t"] - 0.01]
                if wanted and len({e.get("sop") for e in sent}) >= wanted:
                    return {"analysis_done": done[-1], "result_sent": sent,
                            "study_complete": [e for e in self.log.find("study_complete", study_uid)
                                               if e.get("t", 0) >= after - 1],
                            "analysis_started": [e for e in self.log.find("analysis_started", study_uid)
                                                 if e.get("t", 0) >= after - 1]}
                if wanted == 0:
                    raise RuntimeError(f"study {study_uid}: analysis ended without objects: {done[-1].get('reason')}")
            time.sleep(0.05)
        raise RuntimeError(f"no results for {study_uid} after {timeout_s:.0f} s (see {self.workdir / 'logs'})")

    def result_json(self, study_uid: str) -> dict:
        return json.loads((self.results_dir / study_uid / "result.json").read_text())

    def archived(self, study_uid: str) -> list[Path]:
        folder = self.archive_dir / study_uid
        return sorted(folder.glob("*/*.dcm")) if folder.is_dir() else []

    def stop(self) -> None:
        if self.memory is not None:
            self.memory.stop()
        for proc in (self.node, self.archive):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for handle in self._handles:
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "NodeUnderTest":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- end to end ------------------------------------------------------------------------------

def breakdown(sent: dict, events: dict, result: dict, quiet_period_s: float) -> dict:
    """One study's latency, split into the node's stages."""
    t0 = sent["t_last_ack"]
    complete = events["study_complete"][0]["t"] if events["study_complete"] else None
    started = events["analysis_started"][-1]["t"] if events["analysis_started"] else None
    done = events["analysis_done"]["t"]
    acked = max(e["t"] for e in events["result_sent"])
    timings = result.get("timings_s", {})
    stages = {name: float(timings.get(name, 0.0)) for name in STAGES}
    stages["select"] = round(stages["select"] - stages["load"], 3)  # result.json's select includes load
    analysis = done - started if started is not None else None
    row = {
        "e2e_excl_quiet_s": round(acked - t0 - quiet_period_s, 3),
        "e2e_incl_quiet_s": round(acked - t0, 3),
        "quiet_period_s": quiet_period_s,
        "completion_detect_s": round(complete - t0 - quiet_period_s, 3) if complete else None,
        "dispatch_s": round(started - complete, 3) if complete and started else None,
        "analysis_s": round(analysis, 3) if analysis is not None else None,
        "worker_elapsed_s": float(events["analysis_done"].get("elapsed_s", "nan")),
        **{f"stage_{name}_s": round(v, 3) for name, v in stages.items()},
        "send_s": round(acked - done, 3),
        "send_objects": len(events["result_sent"]),
        "ingest_s": round(sent["t_last_ack"] - sent["t_start"], 3),
    }
    if analysis is not None:
        # Holoscan graph set-up, indexing the spool (loader), writing results (incl. encoding SR/SEG to
        # bytes), process hand-over: everything in the analysis that no stage timer covers.
        row["analysis_other_s"] = round(analysis - sum(stages.values()), 3)
    return row


def _median_row(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) for r in rows)]
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in keys}


def run_e2e(study: BenchStudy, work: Path, model: Path, repeats: int, device: str | None, quiet_period_s: float,
            tree: Path = ROOT, log=print, threads: int | None = None) -> dict:
    """Warm-up study, then ``repeats`` studies one after the other (new UIDs each), each timed."""
    clones = [clone_study(study, work / "clones" / f"e2e{i}", f"e2e{i}") for i in range(repeats + 1)]
    rows, memory = [], []
    with NodeUnderTest(work / "node", model, tree, device, quiet_period_s, threads=threads) as node:
        log(f"  node ready in {node.started_s} s (device {device or 'default'}, threads {threads or 'default'})")
        for i, clone in enumerate(clones):
            load_before = load_average()
            node.memory.reset()
            sent = send_study(clone.paths, node.node_port)
            events = node.wait_results(clone.study_uid, sent["t_start"])
            time.sleep(0.2)  # one more memory sample after the last result
            row = breakdown(sent, events, node.result_json(clone.study_uid), quiet_period_s)
            row.update(load_average_before=load_before, load_average_after=load_average(),
                       archived_objects=len(node.archived(clone.study_uid)))
            mem = node.memory.snapshot()
            row["peak_rss_mib"] = mem["peak_total_rss_mib"]
            row["cpu_s"] = mem["cpu_s"]
            if i == 0:
                log(f"  warm-up study: {row['e2e_excl_quiet_s']} s excl. quiet period (not counted)")
                continue
            rows.append(row)
            memory.append(mem)
            log(f"  study {i}/{repeats}: e2e {row['e2e_excl_quiet_s']} s excl. quiet period "
                f"(analysis {row['analysis_s']} s, send {row['send_s']} s, CPU {row['cpu_s']} s, peak RSS "
                f"{row['peak_rss_mib']} MiB, load {row['load_average_before'][0]})")
        node_start = node.started_s
    return {"study": study.name, "description": study.description, "instances": len(study.paths),
            "bytes": study.size_bytes, "device": device or "default", "quiet_period_s": quiet_period_s,
            "node_threads": threads or "default",
            "node_start_s": node_start, "repeats": repeats, "runs": rows, "median": _median_row(rows),
            "memory": memory[int(max(range(len(memory)), key=lambda j: memory[j]["peak_total_rss_mib"]))]
            if memory else {}}


# ---- concurrency ---------------------------------------------------------------------------

def run_concurrency(study: BenchStudy, work: Path, model: Path, senders: int, rounds: int, device: str | None,
                    quiet_period_s: float, tree: Path = ROOT, workers: int = 1, log=print) -> dict:
    """``senders`` associations at once, each sending its own study; studies per minute."""
    results = []
    with NodeUnderTest(work / "node", model, tree, device, quiet_period_s, workers=workers) as node:
        warm = clone_study(study, work / "clones" / "warm", "conc-warm")
        sent = send_study(warm.paths, node.node_port)
        node.wait_results(warm.study_uid, sent["t_start"])
        for r in range(rounds):
            clones = [clone_study(study, work / "clones" / f"r{r}s{s}", f"conc-r{r}-s{s}") for s in range(senders)]
            load_before = load_average()
            node.memory.reset()
            barrier = threading.Barrier(senders)
            outcomes: dict[int, dict] = {}
            errors: list[str] = []

            def sender(index: int) -> None:
                try:
                    barrier.wait()
                    outcomes[index] = send_study(clones[index].paths, node.node_port)
                except Exception as exc:  # reported below
                    errors.append(f"sender {index}: {exc}")

            threads = [threading.Thread(target=sender, args=(s,)) for s in range(senders)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise RuntimeError("; ".join(errors))
            acked = {}
            for s, clone in enumerate(clones):
                events = node.wait_results(clone.study_uid, outcomes[s]["t_start"])
                acked[s] = max(e["t"] for e in events["result_sent"])
            t_first = min(o["t_start"] for o in outcomes.values())
            t_last_ack = max(o["t_last_ack"] for o in outcomes.values())
            t_end = max(acked.values())
            mem = node.memory.snapshot()
            row = {
                "senders": senders, "studies": senders,
                "wall_s": round(t_end - t_first, 2),
                "studies_per_min": round(senders / (t_end - t_first) * 60.0, 2),
                "ingest_all_s": round(t_last_ack - t_first, 2),
                "latency_excl_quiet_s": sorted(round(acked[s] - outcomes[s]["t_last_ack"] - quiet_period_s, 2)
                                               for s in acked),
                "peak_rss_mib": mem["peak_total_rss_mib"], "cpu_s": mem["cpu_s"],
                "load_average_before": load_before, "load_average_after": load_average(),
            }
            results.append(row)
            log(f"  round {r + 1}/{rounds}: {senders} studies in {row['wall_s']} s = {row['studies_per_min']} "
                f"studies/min, peak RSS {row['peak_rss_mib']} MiB, load {load_before[0]}")
    return {"study": study.name, "senders": senders, "workers": workers, "device": device or "default",
            "quiet_period_s": quiet_period_s, "rounds": results,
            "median_studies_per_min": round(statistics.median(r["studies_per_min"] for r in results), 2),
            "median_wall_s": round(statistics.median(r["wall_s"] for r in results), 2),
            "max_peak_rss_mib": max(r["peak_rss_mib"] for r in results)}


# ---- ingest -----------------------------------------------------------------------------------

def _storescu(paths: Sequence[Path], port: int, called_ae: str) -> float:
    """Wall seconds of one ``storescu`` run sending ``paths`` over one association."""
    t0 = time.perf_counter()
    proc = subprocess.run(["storescu", "-aet", SCU_AE, "-aec", called_ae, HOST, str(port), *map(str, paths)],
                          capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"storescu -> {called_ae} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return elapsed


#: The DCMTK receivers of the ingest suite: storescp as DCMTK ships it; with Nagle's algorithm off
#: (DCMTK's TCP_NODELAY=1: the node's sockets have it off too, so this is the fair reference and
#: the one the target is judged against); and with Nagle off plus a ``sync`` after every instance,
#: run synchronously (``-xcr /bin/sync -xs``: storescp runs it after sending the response, but
#: before it reads the next request, so a one-association sender waits for it as it waits for the
#: node's fsyncs). With Nagle on, storescp's small C-STORE response waits for the sender's delayed
#: ACK (~40 ms per instance on Linux loopback), which makes the default storescp an unfairly slow
#: reference. (name, environment, extra arguments)
SCP_VARIANTS = (("storescp", {}, ()), ("storescp_nodelay", {"TCP_NODELAY": "1"}, ()),
                ("storescp_nodelay_sync", {"TCP_NODELAY": "1"}, ("-xcr", "/bin/sync", "-xs")))


def run_ingest(study: BenchStudy, work: Path, model: Path, rounds: int, copies: int, tree: Path = ROOT,
               log=print, baseline_tree: Path | None = None) -> dict:
    """The node's listener and DCMTK storescp receive the same instances from the same storescu,
    in turn (the order rotates every round); a fresh copy with new UIDs every round.

    With ``baseline_tree``, a second node started from that source tree ("node_baseline") takes
    its turn too, so a change to the listener is compared side by side under the same load.
    """
    if not shutil.which("storescp") or not shutil.which("storescu"):
        return {"skipped": "DCMTK storescp/storescu not installed"}
    batches = [[p for c in range(copies) for p in clone_study(study, work / "clones" / f"r{r}c{c}",
                                                                   f"ingest-r{r}-c{c}").paths]
               for r in range(rounds)]
    n = len(batches[0])
    size = sum(p.stat().st_size for p in batches[0])
    rows = []
    scps: dict[str, tuple[subprocess.Popen, int, Path]] = {}
    handles = []
    nodes = {"node": tree} if baseline_tree is None else {"node": tree, "node_baseline": Path(baseline_tree)}
    scp_names = [name for name, _, _ in SCP_VARIANTS]
    # A long quiet period: the nodes only receive during the measurement, they never analyse.
    with contextlib.ExitStack() as stack:
        started = {name: stack.enter_context(NodeUnderTest(work / name, model, node_tree, None, quiet_period_s=3600.0))
                   for name, node_tree in nodes.items()}
        try:
            for name, env, extra in SCP_VARIANTS:
                folder, port = work / name, free_port()
                folder.mkdir(parents=True, exist_ok=True)
                handle = open(work / f"{name}.log", "wb")
                handles.append(handle)
                proc = subprocess.Popen(["storescp", "-aet", SCP_AE, "+B", "-od", str(folder), *extra, str(port)],
                                        stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=dict(os.environ, **env))
                scps[name] = (proc, port, folder)
                deadline = time.time() + 30
                while not echo_ok(port, SCP_AE):
                    if time.time() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"{name} did not answer C-ECHO")
                    time.sleep(0.2)
            receivers = [(name, node.node_port, NODE_AE, node.node.pid) for name, node in started.items()]
            receivers += [(name, scps[name][1], SCP_AE, scps[name][0].pid) for name in scp_names]
            for r, batch in enumerate(batches):
                load_before = load_average()
                order = receivers[r % len(receivers):] + receivers[:r % len(receivers)]
                row = {"round": r + 1, "order": [o[0] for o in order], "load_average_before": load_before}
                for name, port, ae, pid in order:
                    cpu_before = _cpu_seconds(pid)
                    seconds = _storescu(batch, port, ae)
                    # The receiving process's own CPU time: far less sensitive to other people's load
                    # than the wall time (clock ticks of 10 ms over the round).
                    row[f"{name}_cpu_ms_per_instance"] = round(1000 * (_cpu_seconds(pid) - cpu_before) / n, 2)
                    row[f"{name}_s"] = round(seconds, 3)
                    row[f"{name}_mb_per_s"] = round(size / 1e6 / seconds, 2)
                    row[f"{name}_instances_per_s"] = round(n / seconds, 1)
                for node_name in nodes:
                    for name in scp_names:
                        row[f"ratio_{node_name}_over_{name}"] = round(row[f"{node_name}_mb_per_s"]
                                                                      / row[f"{name}_mb_per_s"], 3)
                rows.append(row)
                log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{name} {row[f'{name}_mb_per_s']} MB/s"
                                                              for name, _, _, _ in order)
                    + f"; node / storescp Nagle off {row['ratio_node_over_storescp_nodelay']} (load {load_before[0]})")
                for _, (_, _, folder) in scps.items():
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir()
        finally:
            for proc, _, _ in scps.values():
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for handle in handles:
                handle.close()
    med = lambda key: round(statistics.median(r[key] for r in rows), 3)  # noqa: E731
    out = {"study": study.name, "instances_per_round": n, "bytes_per_round": size, "rounds": rows,
           "receivers": list(nodes) + scp_names,
           **({"baseline_tree": str(baseline_tree)} if baseline_tree is not None else {}),
           "note": "storescu (DCMTK defaults) sends; storescp with +B (bit-preserving), as DCMTK ships it, with "
                   "TCP_NODELAY=1 (Nagle off, like the node), and with Nagle off plus a synchronous /bin/sync "
                   "after each instance; storescp itself never fsyncs. The node (Nagle off) writes each instance "
                   "with fsync of file and folder and an SQLite commit (synchronous=FULL) before the success "
                   "status; CPU ms per instance is the receiving process's user + system time (the node's main "
                   "process; for storescp not the sync it starts)"}
    for name in out["receivers"]:
        out[f"median_{name}_mb_per_s"] = med(f"{name}_mb_per_s")
        out[f"median_{name}_instances_per_s"] = med(f"{name}_instances_per_s")
        out[f"median_{name}_cpu_ms_per_instance"] = med(f"{name}_cpu_ms_per_instance")
    for node_name in nodes:
        prefix = "median_ratio" if node_name == "node" else f"median_ratio_{node_name}"
        for name in scp_names:
            out[f"{prefix}_over_{name}"] = med(f"ratio_{node_name}_over_{name}")
    if baseline_tree is not None:
        for r in rows:
            r["ratio_node_over_node_baseline"] = round(r["node_mb_per_s"] / r["node_baseline_mb_per_s"], 3)
        out["median_ratio_node_over_node_baseline"] = med("ratio_node_over_node_baseline")
    out["median_ratio"] = out["median_ratio_over_storescp_nodelay"]  # the fair reference
    return out
