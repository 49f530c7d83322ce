"""``python -m app reanalyse`` end to end: Orthanc (DICOMweb plugin) as the archive, a real Ray.

The archive holds 20 small synthetic lumbar studies, the real MuscleMap case (written as DICOM
by the loader the other real-data tests use), one study whose T2 pixel data is truncated (the
pipeline fails on it) and one CT study (the QIDO-RS query leaves it out). One Ray head with 2
CPUs serves the module; each run joins it with ``--address`` and uses 2 workers. The first run
analyses the archive from a QIDO-RS query and stores the results back by STOW-RS, while one
worker process is made to die in the middle of a study (``PARASPINAL_REANALYSE_CRASH_ONCE``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from app.config import PROJECT_ROOT, DicomwebDestination
from app.dicomweb import make_client
from paraspinal.nifti_to_dicom import DEFAULT_REAL_DATA_DIR, real_case_series
from paraspinal.synthetic_study import make_synthetic_study
from tests.peers import model_under_test, DICOMWEB_PLUGIN, start_dicomweb_archive, start_ray_head, tool_available

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
N_SYNTHETIC = 20
RUN_TIMEOUT_S = 600


MODEL = model_under_test()
pytestmark = [
    pytest.mark.skipif(MODEL is None, reason="no model bundle"),
    pytest.mark.skipif(not (tool_available("Orthanc") and DICOMWEB_PLUGIN.is_file()),
                       reason="Orthanc and its DICOMweb plugin (Debian orthanc-dicomweb) are needed"),
]


def _small_study(root: Path, seed: int):
    """A lumbar study small enough for 2 shared cores: axial T2 only, 4 slices of 128 x 128."""
    return make_synthetic_study(root, seed=seed, rows=128, cols=128, pixel_spacing=(1.875, 1.875), n_slices=4,
                                include_distractors=False)


def _upload(archive, paths) -> None:
    for path in paths:
        assert archive.rest("POST", "/instances", Path(path).read_bytes())["Status"] in ("Success", "AlreadyStored")


def _reanalyse(head, workdir: Path, url: str, *extra: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", "reanalyse", "--dicomweb", url, "--output-dicomweb", url,
         "--workdir", str(workdir), "--address", head.address, "--workers", "2", "--retries", "1",
         "--model", str(MODEL), "--no-progress", *extra],
        cwd=PROJECT_ROOT, env={**os.environ, **head.env, **(env or {})}, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S)


def _records(workdir: Path) -> dict[str, dict]:
    return {r["study_uid"]: r for r in (json.loads(p.read_text()) for p in (workdir / "studies").glob("*/*.json"))}


def _instances(client, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of every instance of the study in the archive (QIDO-RS)."""
    found = client.search_for_instances(study_instance_uid=study_uid, fields=["SOPClassUID", "SOPInstanceUID"])
    return {i["00080018"]["Value"][0]: i["00080016"]["Value"][0] for i in found}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The archive, the Ray head and the first run (QIDO-RS source, STOW-RS results, a crash)."""
    root = tmp_path_factory.mktemp("reanalyse")
    archive = start_dicomweb_archive(root / "archive")
    head = None
    try:
        synthetic = [_small_study(root / "studies" / f"s{seed}", seed) for seed in range(100, 100 + N_SYNTHETIC)]
        for study in synthetic:
            _upload(archive, study.t2_paths)
        real = real_case_series("musclemap_sub0001", root / "studies" / "real", data_dir=DEFAULT_REAL_DATA_DIR)
        real_files = sorted((root / "studies" / "real").rglob("*.dcm"))
        _upload(archive, real_files)
        real_uid = str(pydicom.dcmread(real_files[0], stop_before_pixels=True).StudyInstanceUID)
        broken = _small_study(root / "studies" / "broken", 7)
        for path in broken.t2_paths:  # half the pixel data: the pipeline cannot decode the slices
            ds = pydicom.dcmread(path)
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
            ds.save_as(path)
        _upload(archive, broken.t2_paths)
        ct = _small_study(root / "studies" / "ct", 8)
        for path in ct.t2_paths:
            ds = pydicom.dcmread(path)
            ds.Modality = "CT"
            ds.save_as(path)
        _upload(archive, ct.t2_paths)

        head = start_ray_head(root / "ray")
        url = f"http://127.0.0.1:{archive.http_port}/dicom-web"
        crashed = synthetic[3].study_uid
        marker = root / "crashed-once"
        workdir = root / "run"
        start = time.monotonic()
        result = _reanalyse(head, workdir, url, "--query", "ModalitiesInStudy=MR", "--studies-per-worker", "5",
                            env={"PARASPINAL_REANALYSE_CRASH_ONCE": f"{crashed},{marker}"})
        yield {"archive": archive, "head": head, "url": url, "workdir": workdir, "result": result, "root": root,
               "synthetic": synthetic, "real_uid": real_uid, "real": real, "broken_uid": broken.study_uid,
               "ct_uid": ct.study_uid,
               "ct_sops": {uid for stack in ct.stacks for uid in stack.sop_instance_uids},
               "crashed_uid": crashed, "marker": marker,
               "client": make_client(DicomwebDestination(url=url)), "elapsed_s": time.monotonic() - start}
    finally:
        if head is not None:
            head.stop()
        archive.stop()


def _log(run: subprocess.CompletedProcess) -> str:
    return f"rc {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}"


def test_results_are_stored_by_stow_rs_into_each_analysed_study(first_run):
    run, client = first_run["result"], first_run["client"]
    records = _records(first_run["workdir"])
    good = [s.study_uid for s in first_run["synthetic"]] + [first_run["real_uid"]]
    assert set(records) == set(good) | {first_run["broken_uid"]}, _log(run)  # the CT study is not in the query
    for study_uid in good:
        record = records[study_uid]
        assert record["status"] == "done", (study_uid, record["reason"], _log(run))
        in_archive = _instances(client, study_uid)
        outputs = {uid: sop_class for sop_class, uid in record["outputs"]}
        assert {SEG_STORAGE, COMPREHENSIVE_3D_SR} <= set(outputs.values())
        assert outputs.items() <= in_archive.items(), study_uid  # stored, and in their own study
    # A stored SEG is a valid segmentation of its study's T2 series.
    study = first_run["synthetic"][0]
    seg_uid = next(uid for sop_class, uid in records[study.study_uid]["outputs"] if sop_class == SEG_STORAGE)
    series_uid = client.search_for_instances(study_instance_uid=study.study_uid, fields=["SeriesInstanceUID"],
                                             search_filters={"SOPInstanceUID": seg_uid})[0]["0020000E"]["Value"][0]
    seg = client.retrieve_instance(study.study_uid, series_uid, seg_uid)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.t2_series_uid
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        <= {uid for stack in study.stacks for uid in stack.sop_instance_uids}
    # The CT study, outside the query, is untouched: its own instances only.
    assert set(_instances(client, first_run["ct_uid"])) == first_run["ct_sops"]


def test_worker_killed_in_the_middle_of_a_study_gets_the_study_retried(first_run):
    run = first_run["result"]
    assert first_run["marker"].is_file(), _log(run)  # the actor's process did end itself in that study
    record = _records(first_run["workdir"])[first_run["crashed_uid"]]
    assert record["status"] == "done" and record["attempts"] == 2, record
    stats = json.loads((first_run["workdir"] / "run.json").read_text())
    assert stats["worker_deaths"] == 1 and stats["workers"] == 2
    # Actors are also replaced on purpose every 5 studies (memory bound): 24 analyses, 2 slots.
    assert stats["workers_replaced"] >= 2 and len(stats["peak_rss_mb_per_worker"]) >= 4
    assert "the worker process died" in run.stderr


def test_failing_study_is_in_the_failure_summary_and_the_run_goes_on(first_run):
    run, workdir = first_run["result"], first_run["workdir"]
    assert run.returncode == 1, _log(run)  # finished, with a failure to report
    with open(workdir / "failures.csv", newline="") as handle:
        failures = list(csv.DictReader(handle))
    assert [f["study_uid"] for f in failures] == [first_run["broken_uid"]]
    assert failures[0]["attempts"] == "2" and "pixel data could not be decoded" in failures[0]["reason"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["failed"] == 1 and summary["outcomes"]["done"] == N_SYNTHETIC + 1
    assert "failed studies: 1" in run.stderr


def test_cohort_table_has_one_row_per_study_muscle_side_and_level(first_run):
    import pyarrow.parquet as pq

    workdir = first_run["workdir"]
    records = _records(workdir)
    table = pq.read_table(workdir / "cohort.parquet").to_pylist()
    with open(workdir / "cohort.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(table) == len(csv_rows) == sum(len(r["rows"]) for r in records.values())
    done = {uid for uid, r in records.items() if r["status"] == "done"}
    assert {row["study_instance_uid"] for row in table} == done
    keys = [(r["study_instance_uid"], r["series_instance_uid"], r["stack"], r["muscle"], r["side"], r["level"])
            for r in table]
    assert len(keys) == len(set(keys))
    for study_uid in done:
        rows = [r for r in table if r["study_instance_uid"] == study_uid and r["found"] == "True"]
        assert {(r["muscle"], r["side"]) for r in rows} >= {("multifidus", "left"), ("multifidus", "right"),
                                                           ("erector spinae", "left"), ("erector spinae", "right")}
        assert all(r["volume_cm3"] > 0 and 0 <= r["fat_fraction_pct"] <= 100 for r in rows if not r["level"])
    # The table holds what each study's results folder said: the real case's rows match its record.
    real_rows = [r for r in csv_rows if r["study_instance_uid"] == first_run["real_uid"]]
    assert real_rows == [{k: v for k, v in row.items()} for row in records[first_run["real_uid"]]["rows"]]


def test_second_run_with_resume_analyses_nothing_new(first_run):
    client, workdir = first_run["client"], first_run["workdir"]
    before = {uid: _instances(client, uid) for uid in _records(workdir)}
    ledger_mtimes = {p: p.stat().st_mtime_ns for p in (workdir / "studies").glob("*/*.json")}
    run = _reanalyse(first_run["head"], workdir, first_run["url"], "--query", "ModalitiesInStudy=MR", "--resume")
    assert "to analyse: 0 (22 already done)" in run.stderr, _log(run)
    assert "ray:" not in run.stderr  # no worker was even started
    assert {p: p.stat().st_mtime_ns for p in (workdir / "studies").glob("*/*.json")} == ledger_mtimes
    assert {uid: _instances(client, uid) for uid in before} == before
    assert run.returncode == 1 and json.loads((workdir / "summary.json").read_text())["failed"] == 1


def test_analysing_a_study_again_stores_the_same_instances(first_run):
    """Output UIDs are derived from the inputs: a second analysis (a study list, no --resume)
    replaces the results with identical SOP instances instead of adding new ones."""
    client, study_uid = first_run["client"], first_run["synthetic"][0].study_uid
    before = _instances(client, study_uid)
    first_outputs = _records(first_run["workdir"])[study_uid]["outputs"]
    study_list = first_run["root"] / "one-study.txt"
    study_list.write_text(f"# again\n{study_uid}\n")
    workdir = first_run["root"] / "again"
    run = _reanalyse(first_run["head"], workdir, first_run["url"], "--study-list", str(study_list))
    assert run.returncode == 0, _log(run)
    record = _records(workdir)[study_uid]
    assert record["status"] == "done" and record["outputs"] == first_outputs
    assert _instances(client, study_uid) == before


def test_qido_paging_lists_each_matching_study_once_even_where_the_archive_cannot_page(first_run, tmp_path):
    """Orthanc 1.10 / DICOMweb 1.7 returns nothing for ModalitiesInStudy with an offset: the source
    notices and asks for the whole list; a filter it does page (StudyDate) goes page by page."""
    from app.reanalyse import sources

    expected = {s.study_uid for s in first_run["synthetic"]} | {first_run["real_uid"], first_run["broken_uid"]}
    client = first_run["client"]
    assert set(sources.qido_study_uids(client, {"ModalitiesInStudy": "MR"}, page=5)) == expected
    paged = list(sources.qido_study_uids(client, {"StudyDate": "19000101-20991231"}, page=5))
    assert len(paged) == len(set(paged)) and set(paged) >= expected | {first_run["ct_uid"]}
    original, sources.QIDO_PAGE = sources.QIDO_PAGE, 5
    try:
        assert sources.spool_qido(client, {"ModalitiesInStudy": "MR"}, tmp_path / "spool.tsv") == len(expected)
    finally:
        sources.QIDO_PAGE = original
    assert {i.study_uid for i in sources.read_spool(tmp_path / "spool.tsv")} == expected


def test_folder_and_list_sources_spool_one_line_per_study(tmp_path):
    from app.reanalyse.sources import read_spool, spool_folder, spool_list

    studies = [_small_study(tmp_path / "exports" / name, seed) for name, seed in (("b", 2), ("a", 1))]
    (tmp_path / "exports" / "notes").mkdir()
    (tmp_path / "exports" / "notes" / "README.txt").write_text("not DICOM")
    assert spool_folder(tmp_path / "exports", tmp_path / "folder.tsv") == 2
    items = list(read_spool(tmp_path / "folder.tsv"))
    assert [(i.study_uid, Path(i.folder).name) for i in items] == [(studies[1].study_uid, "a"),
                                                                    (studies[0].study_uid, "b")]
    (tmp_path / "list.txt").write_text(f"{studies[0].study_uid}\n\n# a comment\n{studies[1].study_uid}  # x\n")
    assert spool_list(tmp_path / "list.txt", tmp_path / "list.tsv") == 2
    assert [i.study_uid for i in read_spool(tmp_path / "list.tsv")] == [s.study_uid for s in studies]
    assert all(i.folder == "" for i in read_spool(tmp_path / "list.tsv"))


def test_folder_source_with_folder_results_publishes_each_study_and_its_cohort_rows(first_run, tmp_path):
    """The research path without an archive: studies in a folder, results to a folder."""
    studies = [_small_study(tmp_path / "exports" / f"p{seed}", seed) for seed in (201, 202)]
    workdir, results = tmp_path / "run", tmp_path / "results"
    head = first_run["head"]
    run = subprocess.run(
        [sys.executable, "-m", "app", "reanalyse", "--folder", str(tmp_path / "exports"), "--output-folder",
         str(results), "--workdir", str(workdir), "--address", head.address, "--workers", "1", "--model", str(MODEL),
         "--no-progress"],
        cwd=PROJECT_ROOT, env={**os.environ, **head.env}, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, _log(run)
    records = _records(workdir)
    assert {uid for uid, r in records.items() if r["status"] == "done"} == {s.study_uid for s in studies}
    for study in studies:
        published = {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in (results / study.study_uid).rglob("*.dcm")}
        assert {"SEG", "SR"} <= published, (study.study_uid, published)
    with open(workdir / "cohort.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["study_instance_uid"] for r in rows} == {s.study_uid for s in studies}
