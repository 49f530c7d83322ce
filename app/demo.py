"""``python -m app demo``: the node's main job, end to end, on this machine.

1. starts the project's local archive (``python -m app.node.archive``) as the PACS;
2. starts the node (``python -m app serve``) with a site configuration written into the
   work folder: loopback, free ports, a 2 s quiet period, the archive as destination;
3. writes a synthetic lumbar MR study (axial T2 plus distractor series) and sends it to the
   node by C-STORE;
4. waits until the SEG and SR are stored in the archive, then prints what arrived, the
   measurement table and the time from the last instance sent to the results stored;
5. stops node and archive.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import IO, Sequence

import pydicom
import yaml

from app.config import RESEARCH_USE_STATEMENT
from app.node.net import free_tcp_port, wait_for_echo
from app.node.sender import store_files

NODE_AE = "PARASPINAL"
ARCHIVE_AE = "DEMOPACS"
SCU_AE = "DEMOSCANNER"
HOST = "127.0.0.1"


class DemoError(RuntimeError):
    """The demo could not complete; the message says where to look."""


def _start(args: Sequence[str], log_path: Path) -> tuple[subprocess.Popen, IO]:
    handle = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, *args], stdout=handle, stderr=subprocess.STDOUT,
                               cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    return process, handle


def _stop(process: subprocess.Popen | None, timeout_s: float = 30.0) -> None:
    """SIGTERM (the node finishes its loops and ends its workers), SIGKILL if it hangs."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _node_config(workdir: Path, node_port: int, archive_port: int, quiet_period_s: float) -> Path:
    node_dir = workdir / "node"
    site = {"node": {
        "ae_title": NODE_AE, "bind_address": HOST, "port": node_port,
        "allowed_peers": [{"ae_title": SCU_AE, "host": HOST}],
        "quiet_period_s": quiet_period_s,
        "spool_dir": str(node_dir / "spool"), "state_db": str(node_dir / "state.sqlite3"),
        "results_dir": str(node_dir / "results"), "failed_dir": str(node_dir / "failed"),
        "workers": 1, "min_free_disk_mb": 50,
        "destinations": [{"ae_title": ARCHIVE_AE, "host": HOST, "port": archive_port}],
        "send_retries": 3, "send_backoff_s": 1.0, "send_backoff_max_s": 5.0,
    }}
    path = workdir / "node.yaml"
    path.write_text("# Written by `python -m app demo`: the node's site configuration for the demo.\n"
                    + yaml.safe_dump(site, sort_keys=False))
    return path


def _wait_worker_ready(state_db: Path, node: subprocess.Popen, timeout_s: float) -> None:
    """The worker loads the model at start; measure steady-state latency, not the first load."""
    from app.node.state import StateStore

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise DemoError("the node stopped while starting")
        if state_db.is_file():
            state = StateStore(state_db, readonly=True)
            try:
                if state.summary(recent=0)["node"].get("worker_ready_at"):
                    return
            finally:
                state.close()
        time.sleep(0.5)
    raise DemoError(f"the node's worker was not ready after {timeout_s:.0f} s")


def _wait_results(results_dir: Path, archive_dir: Path, study_uid: str, node: subprocess.Popen,
                  timeout_s: float) -> tuple[dict, list[Path]]:
    """Until the node's result.json exists and every .dcm it lists is in the archive."""
    deadline = time.monotonic() + timeout_s
    folder = results_dir / study_uid
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise DemoError("the node stopped while the study was being processed")
        result_file = folder / "result.json"
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            if result["status"] != "done":
                raise DemoError(f"analysis ended with status {result['status']}: {result.get('reason')}")
            wanted = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                      for p in folder.glob("*.dcm")}
            arrived = {p.stem: p for p in (archive_dir / study_uid).glob("*/*.dcm")} \
                if (archive_dir / study_uid).is_dir() else {}
            if wanted and wanted <= set(arrived):
                return result, sorted(arrived[uid] for uid in wanted)
        time.sleep(0.1)
    raise DemoError(f"no results in the archive after {timeout_s:.0f} s")


def _print_arrivals(paths: list[Path], archive_dir: Path) -> None:
    print(f"\nResults stored in the archive ({ARCHIVE_AE}, {archive_dir}):")
    print(f"  {'file':<44} {'SOP class':<30} {'modality':<8} {'series':>6}  description")
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        print(f"  {path.parent.name[-20:] + '/' + path.name[-23:]:<44} {ds.SOPClassUID.name:<30}"
              f" {ds.get('Modality', ''):<8} {ds.get('SeriesNumber', ''):>6}  {ds.get('SeriesDescription', '')}")


def _fmt(value: str, digits: int) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except ValueError:
        return value or "-"


def _print_measurements(csv_path: Path) -> None:
    rows = list(csv.DictReader(csv_path.open()))
    methods = sorted({r.get("fat_method", "") for r in rows} - {""})
    print(f"\nMeasurements ({csv_path.name}; per stack and muscle, patient's side;"
          f" fat by {', '.join(methods) or '?'}):")
    header = (f"  {'stack':>5}  {'muscle':<20} {'side':<5} {'found':<5} {'volume cm3':>10} {'mean CSA mm2':>12}"
              f" {'max CSA mm2':>11} {'fat %':>6} {'slices':>6}  {'QC':<6}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for r in rows:
        muscle = r.get("muscle", "") + (f" @{r['level']}" if r.get("level") else "")  # per-level rows
        print(f"  {r.get('stack', ''):>5}  {muscle:<20} {r.get('side', ''):<5} {r.get('found', ''):<5}"
              f" {_fmt(r.get('volume_cm3', ''), 1):>10} {_fmt(r.get('mean_csa_mm2', ''), 0):>12}"
              f" {_fmt(r.get('max_csa_mm2', ''), 0):>11} {_fmt(r.get('fat_fraction_pct', ''), 1):>6}"
              f" {r.get('n_slices_with_muscle', ''):>6}  {_review(r):<6}")
    flagged = [r for r in rows if r.get("review_recommended") == "yes" and not r.get("level")]
    for r in flagged:
        print(f"  review recommended, stack {r.get('stack')} {r.get('muscle')} {r.get('side')}: {r.get('review_reasons')}")


def _review(row: dict) -> str:
    """The quality-control cell: REVIEW / ok (per-level rows and old results: blank)."""
    if row.get("level") or not row.get("review_recommended"):
        return ""
    return "REVIEW" if row["review_recommended"] == "yes" else "ok"


def _print_timing(t_last_sent: float, t_stored: float, quiet_period_s: float, state_db: Path, study_uid: str) -> None:
    from app.node.state import StateStore

    state = StateStore(state_db, readonly=True)
    try:
        study = state.study(study_uid) or {}
        sent = [r["sent_at"] for r in state.outbox_rows(study_uid) if r["status"] == "sent"]
    finally:
        state.close()
    total = t_stored - t_last_sent
    print(f"\nTiming (the node's quiet period is {quiet_period_s:g} s for this demo; default 10 s):")
    print(f"  last instance sent -> results stored in the archive: {total:6.2f} s")
    print(f"  of which the quiet period (waiting for more instances): {quiet_period_s:6.2f} s")
    print(f"  excluding the quiet period:                           {total - quiet_period_s:6.2f} s")
    if study.get("started_at") and study.get("finished_at") and sent:
        print(f"    analysis (pipeline on the spooled study):            "
              f"{study['finished_at'] - study['started_at']:6.2f} s")
        print(f"    sending (C-STORE of the results to the archive):      {max(sent) - study['finished_at']:6.2f} s")


def run_demo(workdir: Path, model_path: Path, quiet_period_s: float = 2.0, seed: int = 0,
             timeout_s: float = 900.0) -> int:
    """Run the demo in ``workdir`` (its node/, archive/, study/ and logs/ are recreated).

    Returns the process exit status (0 when the results arrived).
    """
    from paraspinal.model_bundle import BundleError, find_bundle
    from paraspinal.synthetic_study import make_synthetic_study

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # connection attempts while peers start
    workdir = Path(workdir).resolve()
    try:
        bundle = find_bundle(Path(model_path))
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in ("node", "archive", "study", "logs"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    (workdir / "logs").mkdir(parents=True)
    archive_port, node_port = free_tcp_port(), free_tcp_port()
    config_path = _node_config(workdir, node_port, archive_port, quiet_period_s)
    node_dir, archive_dir = workdir / "node", workdir / "archive"
    print(f"Paraspinal node demo in {workdir}")
    print(f"  archive (PACS) {ARCHIVE_AE}@{HOST}:{archive_port}; node {NODE_AE}@{HOST}:{node_port};"
          f" model {bundle}")
    print(f"  quiet period {quiet_period_s:g} s (demo setting; the default is 10 s); logs in {workdir / 'logs'}")
    archive = node = None
    handles: list[IO] = []
    try:
        archive, handle = _start(["-m", "app.node.archive", "--dir", str(archive_dir), "--port", str(archive_port),
                                  "--ae-title", ARCHIVE_AE], workdir / "logs" / "archive.log")
        handles.append(handle)
        node, handle = _start(["-m", "app", "--config", str(config_path), "serve", "--model", str(model_path)],
                              workdir / "logs" / "node.log")
        handles.append(handle)
        if not wait_for_echo(HOST, archive_port, ARCHIVE_AE, 60, SCU_AE, alive=lambda: archive.poll() is None):
            raise DemoError("the archive did not answer C-ECHO")
        if not wait_for_echo(HOST, node_port, NODE_AE, 180, SCU_AE, alive=lambda: node.poll() is None):
            raise DemoError("the node did not answer C-ECHO")
        _wait_worker_ready(node_dir / "state.sqlite3", node, 300)
        print("  node and archive answer C-ECHO; the worker has loaded the model")

        study = make_synthetic_study(workdir / "study", seed=seed)
        by_series = Counter(p.parent.name for p in study.all_paths)
        print(f"\nSynthetic lumbar MR study {study.study_uid}:")
        for series, count in sorted(by_series.items()):
            print(f"  {series:<24} {count:3d} instances")

        t_first = time.time()
        outcomes = store_files(study.all_paths, SCU_AE, NODE_AE, HOST, node_port)
        t_last_sent = time.time()
        failed = [(p.name, s, n) for p, s, n in outcomes if s != 0]
        if failed:
            raise DemoError(f"{len(failed)} instance(s) not accepted by the node, e.g. {failed[0]}")
        print(f"  sent {len(outcomes)} instances by C-STORE in {t_last_sent - t_first:.2f} s"
              f" ({SCU_AE} -> {NODE_AE}); waiting for the results ...")

        result, arrived = _wait_results(node_dir / "results", archive_dir, study.study_uid, node, timeout_s)
        t_stored = max(p.stat().st_mtime for p in arrived)
        chosen = result.get("chosen_series") or {}
        print(f"\nThe node chose series {chosen.get('series_number', '?')} '{chosen.get('series_description', '?')}'"
              f" ({chosen.get('reason', '')}); {result['reason']}")
        _print_arrivals(arrived, archive_dir)
        _print_measurements(node_dir / "results" / study.study_uid / "measurements.csv")
        _print_timing(t_last_sent, t_stored, quiet_period_s, node_dir / "state.sqlite3", study.study_uid)
        print(f"\nNode status (python -m app --config {config_path} status):")
        status = subprocess.run([sys.executable, "-m", "app", "--config", str(config_path), "status", "--recent", "0"],
                                capture_output=True, text=True, timeout=60)
        print("  " + status.stdout.strip().replace("\n", "\n  "))
        print(f"\n{RESEARCH_USE_STATEMENT}")
        return 0
    except DemoError as exc:
        print(f"\ndemo failed: {exc} (see {workdir / 'logs'})", file=sys.stderr)
        return 1
    finally:
        _stop(node)
        _stop(archive)
        for handle in handles:
            handle.close()
        print("node and archive stopped")
