"""Throughput of ``python -m app reanalyse`` on this machine, and a paper plan for 100,000 studies.

``python -m benchmarks.reanalyse`` (``make bench-reanalyse``) prints figures; it asserts nothing.

It fills a local Orthanc (DICOMweb plugin) with ``--synthetic`` small synthetic studies and
``--real-copies`` copies of the real MuscleMap case (256 x 208 x 20 axial TSE, each copy with
fresh UIDs), then runs the real command on a local Ray (``--num-cpus``), once with 1 worker and
once with 2, each from an empty run folder: QIDO-RS query, WADO-RS fetch, pipeline, STOW-RS of
the results back into the archive. From each run's ``run.json`` and ledger it prints:

* studies/hour of the analysis loop (actor start-up, i.e. Ray and model loading, excluded and
  shown apart) and the scaling efficiency ``rate(2) / (2 x rate(1))``;
* per-study wall time by kind of study (1 worker: the core-seconds one study costs, since Ray
  gives a 1-CPU actor one torch thread) and the pipeline's stage split;
* each worker's resident memory at start, after its first study and after its last, and its peak;
* a paper plan for 100,000 studies from the real-case per-study figure (``--plan-*`` options set
  the assumed machine size and price; no GPU was measured unless this machine has one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paraspinal.dicom_series_writer import StudyInfo  # noqa: E402
from paraspinal.nifti_to_dicom import real_case_series  # noqa: E402
from paraspinal.synthetic_study import make_synthetic_study  # noqa: E402
from tests.peers import start_dicomweb_archive  # noqa: E402

STUDIES_PLANNED = 100_000


def _fill_archive(archive, root: Path, n_synthetic: int, n_real: int) -> dict[str, str]:
    """Upload the studies; returns Study Instance UID -> kind (synthetic | real)."""
    kinds = {}
    for seed in range(n_synthetic):
        study = make_synthetic_study(root / f"syn{seed}", seed=1000 + seed, rows=128, cols=128,
                                     pixel_spacing=(1.875, 1.875), n_slices=8, include_distractors=False)
        for path in study.t2_paths:
            archive.rest("POST", "/instances", Path(path).read_bytes())
        kinds[study.study_uid] = "synthetic 128x128x8"
    for copy in range(n_real):
        info = StudyInfo(patient_name=f"BENCH^REAL{copy}", patient_id=f"BENCHREAL{copy}")
        real_case_series("musclemap_sub0001", root / f"real{copy}", study=info)
        for path in sorted((root / f"real{copy}").rglob("*.dcm")):
            archive.rest("POST", "/instances", path.read_bytes())
        kinds[info.study_instance_uid] = "real 256x208x20"
    return kinds


def _run(url: str, workdir: Path, workers: int, num_cpus: int) -> tuple[dict, list[dict], float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "app", "reanalyse", "--dicomweb", url, "--query",
                           "ModalitiesInStudy=MR", "--output-dicomweb", url, "--workdir", str(workdir),
                           "--workers", str(workers), "--num-cpus", str(num_cpus), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"reanalyse failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    records = [json.loads(p.read_text()) for p in (workdir / "studies").glob("*/*.json")]
    return json.loads((workdir / "run.json").read_text()), records, wall


def _memory_lines(records: list[dict], stats: dict) -> list[str]:
    by_worker: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["finished_at"]):
        by_worker.setdefault(f"{r['host']}:{r['pid']}", []).append(r)
    lines = []
    for worker, rs in by_worker.items():
        start = stats["worker_start_rss_mb"].get(worker)
        start_text = f"{start:.0f} MiB" if start is not None else "n/a (a replacement)"
        lines.append(f"    worker {worker}: {len(rs)} studies; RSS at start {start_text}, after first study "
                     f"{rs[0]['rss_mb']:.0f}, after last {rs[-1]['rss_mb']:.0f}; peak {rs[-1]['peak_rss_mb']:.0f} MiB")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=16, help="small synthetic studies in the archive")
    parser.add_argument("--real-copies", type=int, default=6, help="copies of the real case in the archive")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--plan-cores-per-machine", type=int, default=32)
    parser.add_argument("--plan-price-per-machine-hour", type=float, default=1.50,
                        help="assumed on-demand price of such a CPU machine, USD/h (check your provider)")
    parser.add_argument("--plan-gpu-price-per-hour", type=float, default=2.50,
                        help="assumed price of a 1-GPU machine, USD/h (check your provider)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-reanalyse-"))
    archive = start_dicomweb_archive(work / "archive")
    try:
        kinds = _fill_archive(archive, work / "studies", args.synthetic, args.real_copies)
        url = f"http://127.0.0.1:{archive.http_port}/dicom-web"
        load = os.getloadavg()
        print(f"machine: {os.cpu_count()} cores, load average before {load[0]:.2f}; local Ray --num-cpus "
              f"{args.num_cpus}; no GPU used")
        print(f"archive: Orthanc + DICOMweb, {args.synthetic} synthetic (128x128x8) + {args.real_copies} real "
              f"(MuscleMap sub0001, 256x208x20) studies")
        results = {}
        for workers in (1, 2):
            # Each run stores into the same archive: the 2nd run's STOW-RS replaces identical instances.
            stats, records, wall = _run(url, work / f"run{workers}", workers, args.num_cpus)
            results[workers] = (stats, records)
            print(f"\n{workers} worker(s): {stats['analysed']} studies in {stats['analysis_wall_s']:.1f} s of analysis "
                  f"-> {stats['studies_per_hour']:.0f} studies/h; actor start (Ray + model load) "
                  f"{stats['actor_start_s']:.1f} s; workers replaced after {stats['studies_per_worker']} studies: "
                  f"{stats['workers_replaced']}; command wall {wall:.1f} s; load average now {os.getloadavg()[0]:.2f}")
            for kind in sorted(set(kinds.values())):
                times = [r["elapsed_s"] for r in records if kinds.get(r["study_uid"]) == kind]
                if times:
                    print(f"    {kind}: per study median {statistics.median(times):.2f} s "
                          f"(min {min(times):.2f}, max {max(times):.2f}, n {len(times)})")
            print("\n".join(_memory_lines(records, stats)))
        r1, r2 = results[1][0]["studies_per_hour"], results[2][0]["studies_per_hour"]
        print(f"\nscaling efficiency 2 workers vs 1: {r2 / (2 * r1):.2f} ({r2:.0f} vs 2 x {r1:.0f} studies/h)")

        real = [r for r in results[1][1] if kinds.get(r["study_uid"], "").startswith("real")]
        if real:
            per_study = statistics.median(r["elapsed_s"] for r in real)
            stages: dict[str, list[float]] = {}
            for r in real:
                for stage, seconds in r.get("timings_s", {}).items():
                    stages.setdefault(stage, []).append(seconds)
            split = {k: statistics.median(v) for k, v in stages.items()}
            inference_share = split.get("inference", 0.0) / per_study if per_study else 0.0
            core_hours = STUDIES_PLANNED * per_study / 3600.0
            machine_hours = core_hours / args.plan_cores_per_machine
            peak = max(results[2][0]["peak_rss_mb_per_worker"].values())
            print(f"\nplan for {STUDIES_PLANNED:,} studies like the real case (1 worker = 1 core: "
                  f"{per_study:.1f} core-s per study; stages " + ", ".join(f"{k} {v:.1f}" for k, v in split.items())
                  + " s):")
            print(f"  CPU: {core_hours:,.0f} core-hours; {args.plan_cores_per_machine}-core machines with "
                  f"{args.plan_cores_per_machine} workers x {peak / 1024:.1f} GiB peak each "
                  f"(~{args.plan_cores_per_machine * peak / 1024:.0f} GiB RAM): "
                  f"10 machines -> {machine_hours / 10:.1f} h, 50 -> {machine_hours / 50:.1f} h; cost "
                  f"~${machine_hours * args.plan_price_per_machine_hour:,.0f} at "
                  f"${args.plan_price_per_machine_hour}/machine-hour (assumed), plus archive egress")
            print(f"  GPU: not measured (no GPU on this machine). Inference is {inference_share:.0%} of a study's "
                  f"CPU time here; a GPU removes at most that share, the rest (N4, quantification, SEG/SR/PDF "
                  f"encoding, I/O) stays on CPU cores: at best {per_study * (1 - inference_share):.1f} core-s per "
                  f"study; measure with --gpus-per-worker 1 before buying GPUs "
                  f"(${args.plan_gpu_price_per_hour}/GPU-hour assumed)")
        print("\nresearch software, not a medical device")
    finally:
        archive.stop()
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
