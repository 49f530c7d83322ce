"""The benchmark harness (``python -m benchmarks``, ``make bench``) runs and writes its results.

A smoke test: every suite once on a tiny synthetic study (``--quick``), JSON and markdown
written and well-formed. The figures themselves are not checked: benchmarks print figures,
tests never assert on time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks.nodebench import breakdown, parse_log_line
from benchmarks.report import NOT_MEASURED_GPU, target_rows, to_markdown
from tests.conftest import MODEL_PATH, ROOT


def test_quick_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--name", "smoke", "--workdir",
         str(tmp_path / "work"), "--data-dir", str(tmp_path / "data"), "--model", str(MODEL_PATH)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "smoke.json").read_text())
    assert not results["errors"]
    assert results["machine"]["logical_cpus"] >= 1 and len(results["machine"]["load_average_at_start"]) == 3
    assert results["model"]["weights_sha256"]
    inference = results["inference"][0]["stacks"][0]
    assert inference["series"] == "tiny" and inference["network_median_s"] > 0
    assert set(results["stages"]["median_s"]) >= {"load", "inference", "quantification", "sr_encode", "report"}
    (e2e,) = [e for e in results["e2e"] if e["device"] == "cpu"]
    run = e2e["runs"][0]
    assert run["archived_objects"] == run["send_objects"] >= 2  # SEG, SR (and PDF) acknowledged by the archive
    assert run["e2e_excl_quiet_s"] > 0 and run["peak_rss_mib"] > 0
    assert all(f"stage_{s}_s" in run for s in ("load", "inference", "quantification", "seg_encode", "sr_encode"))
    assert results["ingest"].get("skipped") or results["ingest"]["median_ratio"] > 0
    assert results["concurrency"]["rounds"][0]["studies"] == 2
    markdown = (out / "smoke.md").read_text()
    assert "## Targets" in markdown and "## End to end" in markdown and "## Ingest" in markdown
    if not torch.cuda.is_available():
        assert NOT_MEASURED_GPU in markdown
    assert markdown in proc.stdout


def test_log_line_parsing_and_breakdown():
    line = ('ts=2026-01-02T03:04:05.250Z level=INFO logger=app.node.worker event=analysis_done '
            'study=1.2.3.4.5 outcome=done elapsed_s=8.1 reason="2 DICOM object(s) written" objects=2')
    event = parse_log_line(line)
    assert event["event"] == "analysis_done" and event["reason"] == "2 DICOM object(s) written"
    assert abs(event["t"] - 1767323045.25) < 1e-6
    sent = {"t_start": 100.0, "t_last_ack": 101.0}
    events = {"study_complete": [{"t": 102.1}], "analysis_started": [{"t": 102.2}],
              "analysis_done": {"t": 110.2, "elapsed_s": "7.9"}, "result_sent": [{"t": 110.5}, {"t": 110.7}]}
    result = {"timings_s": {"load": 0.5, "select": 0.6, "preprocess": 1.0, "inference": 3.0, "quantification": 1.0,
                            "seg_encode": 0.5, "sr_encode": 0.5, "report": 0.5}}
    row = breakdown(sent, events, result, quiet_period_s=1.0)
    assert row["e2e_excl_quiet_s"] == 8.7 and row["send_s"] == 0.5 and row["stage_select_s"] == 0.1
    assert row["analysis_other_s"] == round(8.0 - 7.1, 3)


def test_targets_say_gpu_not_measured_without_a_gpu():
    results = {"machine": {"gpu": {"available": False}}, "e2e": [], "inference": []}
    rows = {r["target"]: r for r in target_rows(results)}
    assert rows["GPU inference, 50-slice series"]["measured"] == NOT_MEASURED_GPU
    assert rows["end to end with a GPU (excl. quiet period)"]["measured"] == NOT_MEASURED_GPU
    assert "## Targets" in to_markdown(results)
