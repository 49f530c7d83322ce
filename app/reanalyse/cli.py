"""``python -m app reanalyse``: re-analyse an archive (or a folder of studies) on Ray.

One :class:`~app.reanalyse.actors.StudyAnalyser` actor per worker holds a loaded model; Ray
places the actors (on GPUs where it schedules them) and restarts one whose process dies. The
driver here only bounds what is in flight -- one study per actor, so at most ``--workers``
studies are fetched or analysed at any time and memory stays flat however long the list --
and records each final outcome in the run folder's ledger. A study that fails (the pipeline
says failed, it cannot be fetched or its results stored, or its worker died) is submitted
again, up to ``--retries`` more times, then recorded as failed with its reason; the run goes on.

The run folder (``--workdir``) holds ``studies.tsv`` (the spooled source), ``studies/`` (the
ledger), and at the end ``cohort.parquet``, ``cohort.csv``, ``failures.csv``, ``summary.json``
and ``run.json`` (timings: studies/hour, peak memory per worker).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator

from app.config import DEFAULT_MODEL_PATH, PROJECT_ROOT, ConfigError, DicomwebDestination, load_config
from app.reanalyse.cohort import format_summary, write_cohort
from app.reanalyse.ledger import FINAL_OK, StudyLedger
from app.reanalyse.sources import StudyItem, read_spool, spool_folder, spool_list, spool_qido

log = logging.getLogger(__name__)

#: Fault injection for tests: ``<StudyInstanceUID>,<marker file>`` (see app.reanalyse.actors).
CRASH_ONCE_ENV = "PARASPINAL_REANALYSE_CRASH_ONCE"
#: Readiness checks (1 s apart) of a restarting actor before the run goes on without it.
MAX_READINESS_CHECKS = 600


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``reanalyse`` on the ``python -m app`` command line."""
    p = sub.add_parser("reanalyse", help="re-analyse an archive (QIDO-RS query, study list or folder) on Ray",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source (one of: --dicomweb with --query/--study-list, or --folder)")
    src.add_argument("--dicomweb", metavar="URL", help="DICOMweb root of the archive (QIDO-RS, WADO-RS)")
    src.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                     help="QIDO-RS study filter, repeatable: ModalitiesInStudy=MR, StudyDate=20200101-20201231, "
                          "BodyPartExamined=LSPINE (what an archive supports varies)")
    src.add_argument("--study-list", metavar="FILE", help="Study Instance UIDs, one per line, fetched from --dicomweb")
    src.add_argument("--folder", metavar="DIR", help="a folder of studies on disk, one per sub-folder")
    src.add_argument("--auth-header-file", help="file with one HTTP header line for the archive")
    src.add_argument("--token-file", help="file with a bearer token for the archive")
    src.add_argument("--ca-bundle", help="PEM CAs of the archive's HTTPS certificate")
    out = p.add_argument_group("results (one of)")
    out.add_argument("--output-dicomweb", metavar="URL", help="store results by STOW-RS here (credentials: "
                     "--output-auth-header-file/--output-token-file/--output-ca-bundle, else the source's "
                     "when the URL is the source's)")
    out.add_argument("--output-auth-header-file")
    out.add_argument("--output-token-file")
    out.add_argument("--output-ca-bundle")
    out.add_argument("--output-folder", metavar="DIR", help="publish result folders here (<DIR>/<StudyInstanceUID>/; "
                     "on a multi-machine cluster a folder every node mounts)")
    run = p.add_argument_group("run")
    run.add_argument("--workdir", default="reanalyse-run", help="the run folder: ledger, cohort table, summary")
    run.add_argument("--resume", action="store_true", help="skip studies the run folder's ledger has an outcome "
                     "for (done, nothing to analyse, or failed after its retries)")
    run.add_argument("--retry-failed", action="store_true", help="with --resume: analyse failed studies again")
    run.add_argument("--retries", type=int, default=2, help="more tries of a failed study before it is recorded "
                     "as failed (default 2)")
    run.add_argument("--address", help="Ray cluster to join (e.g. 10.0.0.1:6379 or auto); default: a local Ray")
    run.add_argument("--workers", type=int, help="actors (default: the cluster's GPUs when it has any, else its "
                     "CPUs / --cpus-per-worker)")
    run.add_argument("--studies-per-worker", type=int, default=20,
                     help="replace an actor (a fresh process, the model loaded again) after this many studies, "
                          "so its memory stays bounded (0: never; default 20)")
    run.add_argument("--cpus-per-worker", type=float, default=1.0)
    run.add_argument("--gpus-per-worker", type=float, help="default: 1 when the cluster has GPUs, else 0")
    run.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    run.add_argument("--device", help="torch device in the actors (default: cuda where Ray gave a GPU, else cpu)")
    run.add_argument("-m", "--model", help="model bundle or models folder (default $HOLOSCAN_MODEL_PATH or ./models); "
                     "the same path must hold it on every Ray node")
    run.add_argument("--scratch-dir", help="where actors fetch studies to (default: the system temp folder)")
    run.add_argument("--worker-logs", action="store_true", help="show the actors' own log lines here")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reanalyse)


def _service(url: str, auth_header_file: str | None, token_file: str | None, ca_bundle: str | None
             ) -> DicomwebDestination:
    return DicomwebDestination(url=url, auth_header_file=Path(auth_header_file) if auth_header_file else None,
                               token_file=Path(token_file) if token_file else None,
                               ca_bundle=Path(ca_bundle) if ca_bundle else None)


def _parse_filters(pairs: list[str]) -> dict[str, str]:
    filters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--query {pair!r}: expected KEY=VALUE")
        filters[key.strip()] = value.strip()
    return filters


def _spool(args: argparse.Namespace, source: DicomwebDestination | None, spool: Path) -> int:
    if args.folder:
        return spool_folder(Path(args.folder), spool)
    if args.study_list:
        return spool_list(Path(args.study_list), spool)
    from app.dicomweb import make_client

    return spool_qido(make_client(source), _parse_filters(args.query), spool)


def _todo(spool: Path, ledger: StudyLedger, resume: bool, retry_failed: bool) -> Iterator[StudyItem]:
    for item in read_spool(spool):
        if not (resume and ledger.finished(item.study_uid, retry_failed)):
            yield item


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """A tqdm bar with studies/hour and the time left, from the studies finished so far."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="study", file=sys.stderr, disable=not enabled, mininterval=1.0,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.total, self.done, self.failed = total, 0, 0
        self.start = time.monotonic()

    def rate_per_h(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed * 3600.0 if elapsed > 0 else 0.0

    def step(self, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)
        rate = self.rate_per_h()
        eta = (self.total - self.done) / rate * 3600.0 if rate > 0 else 0.0
        self.bar.set_postfix_str(f"{rate:,.0f} studies/h, ETA {_format_eta(eta)}, failed {self.failed}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _start_ray(args: argparse.Namespace) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a hospital node phones nobody
    if args.address:
        ray.init(address=args.address, log_to_driver=args.worker_logs, logging_level=logging.WARNING)
        return
    # A local Ray's workers are children of this process: they get the project on their path.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    # address="local": always a new Ray of our own, never a cluster some other `ray start` left here.
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=args.worker_logs,
             logging_level=logging.WARNING)


def _sizing(args: argparse.Namespace) -> tuple[int, float, float]:
    """(workers, CPUs per worker, GPUs per worker) from the flags and the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if resources.get("GPU", 0) else 0.0)
    cpus = args.cpus_per_worker
    if args.workers:
        workers = args.workers
    elif gpus:
        workers = int(resources.get("GPU", 0) // gpus)
    else:
        workers = int(resources.get("CPU", 1) // cpus)
    return max(1, workers), cpus, gpus


def _failure_reason(exc: BaseException) -> str:
    import ray.exceptions as rex

    if isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError)):
        return f"the worker process died during the study ({type(exc).__name__})"
    cause = getattr(exc, "cause", None)
    if isinstance(exc, rex.RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"[:2000]
    return f"{type(exc).__name__}: {exc}"[:2000]


def run_reanalysis(args: argparse.Namespace, source: DicomwebDestination | None,
                   output: DicomwebDestination | None, model_path: Path) -> int:
    """Spool, analyse what is to do on Ray, write the cohort; returns the exit status."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ledger = StudyLedger(workdir)
    spool = workdir / "studies.tsv"
    n_source = _spool(args, source, spool)
    n_todo = sum(1 for _ in _todo(spool, ledger, args.resume, args.retry_failed))
    print(f"source: {n_source} studies; to analyse: {n_todo}"
          + (f" ({n_source - n_todo} already done)" if args.resume else ""), file=sys.stderr)
    stats: dict[str, Any] = {"source_studies": n_source, "analysed": 0, "workers": 0}
    if n_todo:
        stats.update(_analyse_on_ray(args, source, output, model_path, spool, ledger, n_todo))
    summary = write_cohort(ledger, workdir)
    (workdir / "run.json").write_text(json.dumps({**stats, "summary": summary}, indent=2) + "\n")
    print(format_summary(summary), file=sys.stderr)
    return 1 if summary["failed"] else 0


def _analyse_on_ray(args: argparse.Namespace, source: DicomwebDestination | None,
                    output: DicomwebDestination | None, model_path: Path, spool: Path, ledger: StudyLedger,
                    n_todo: int) -> dict[str, Any]:
    import ray

    from app.reanalyse.actors import StudyAnalyser

    crash = os.environ.get(CRASH_ONCE_ENV)
    crash_once = tuple(crash.split(",", 1)) if crash else None
    config = load_config(args.config)
    t0 = time.monotonic()
    _start_ray(args)
    workers, cpus, gpus = _sizing(args)
    workers = min(workers, n_todo)
    # max_restarts=-1: a dead actor comes back (reloading the model); the study it held is failed
    # by Ray (max_task_retries=0) and resubmitted by the loop below, which counts the attempt.
    Analyser = ray.remote(StudyAnalyser).options(num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=0)
    def new_actor():
        return Analyser.remote(str(model_path), config, args.device, source, output,
                               str(Path(args.output_folder).resolve()) if args.output_folder else None,
                               args.scratch_dir, crash_once)

    actors = [new_actor() for _ in range(workers)]
    try:
        identities = ray.get([a.identity.remote() for a in actors])
    except ray.exceptions.RayError as exc:  # e.g. the model or the pipeline does not load on a node
        raise SystemExit(f"error: the workers did not start: {_failure_reason(exc)}") from None
    ready_s = time.monotonic() - t0
    print(f"ray: {workers} worker(s) ready in {ready_s:.1f} s: "
          + ", ".join(f"{i['host']}:{i['pid']} {i['device']} ({i['torch_threads']} torch threads)" for i in identities),
          file=sys.stderr)

    progress = _Progress(n_todo, not args.no_progress)
    items = _todo(spool, ledger, args.resume, args.retry_failed)
    retry: deque[tuple[StudyItem, int]] = deque()
    free = list(range(workers))
    # ref -> (actor index, item, attempt); item None: a readiness check of an actor that died
    inflight: dict[Any, tuple[int, StudyItem | None, int]] = {}
    checks_due: dict[int, float] = {}  # actor index -> monotonic time of its next readiness check
    check_failures = [0] * workers
    served = [0] * workers  # studies since the actor in this slot started
    replaced = 0
    peak_rss: dict[str, float] = {}
    analysed = crashes = 0
    exhausted = False  # the source has given its last study
    t_loop = time.monotonic()
    while True:
        for index, due in list(checks_due.items()):
            if time.monotonic() >= due:  # a restarted actor gets studies again once it answers
                del checks_due[index]
                inflight[actors[index].identity.remote()] = (index, None, 0)
        while free:  # backpressure: a study is taken from the source only when an actor is free
            if retry:
                item, attempt = retry.popleft()
            else:
                item, attempt = next(items, None), 1
                if item is None:
                    exhausted = True
                    break
            index = free.pop()
            inflight[actors[index].analyse.remote(item.study_uid, item.folder)] = (index, item, attempt)
        if exhausted and not retry and not any(item is not None for _, item, _ in inflight.values()):
            break  # all done (an actor still starting is not waited for: nothing is left for it)
        if not inflight and not checks_due:
            raise RuntimeError("every worker is gone (they did not come back after dying): see the Ray logs")
        if not inflight:  # every actor is restarting: its readiness check is due within a second
            time.sleep(0.2)
            continue
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0 if checks_due else None)
        for ref in ready:
            index, item, attempt = inflight.pop(ref)
            actor_lost = False
            try:
                outcome = ray.get(ref)
                reason = outcome["reason"] if item is not None and outcome["status"] == "failed" else ""
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                outcome, reason, actor_lost = None, _failure_reason(exc), True
            except Exception as exc:  # RayTaskError: fetching, the pipeline or storing raised
                outcome, reason = None, _failure_reason(exc)
            if item is None:  # a readiness check
                if not actor_lost:
                    check_failures[index] = 0
                    free.append(index)
                elif check_failures[index] < MAX_READINESS_CHECKS:
                    check_failures[index] += 1
                    checks_due[index] = time.monotonic() + 1.0
                else:
                    log.error("worker %d did not come back after %d checks; going on without it", index,
                              MAX_READINESS_CHECKS)
                continue
            served[index] += 1
            if actor_lost:  # Ray restarts the actor (and reloads the model): check before reuse
                crashes += 1
                served[index] = 0
                checks_due[index] = time.monotonic() + 1.0
            elif args.studies_per_worker and served[index] >= args.studies_per_worker:
                # In a Ray worker the pipeline's resident memory creeps up study after study (about
                # 20-40 MiB each, measured; not in a plain process): a fresh process bounds it.
                ray.kill(actors[index], no_restart=True)
                actors[index], served[index] = new_actor(), 0
                replaced += 1
                checks_due[index] = time.monotonic()
            else:
                free.append(index)
            if outcome is not None:
                key = f"{outcome['host']}:{outcome['pid']}"
                peak_rss[key] = max(peak_rss.get(key, 0.0), outcome["peak_rss_mb"])
            if reason and attempt <= args.retries:
                log.warning("study %s attempt %d failed (%s); retrying", item.study_uid, attempt, reason)
                retry.append((item, attempt + 1))
                continue
            record = dict(outcome or {"study_uid": item.study_uid, "status": "failed", "rows": [], "outputs": []})
            record.update(attempts=attempt, reason=reason or record.get("reason", ""),
                          folder=item.folder, finished_at=time.time())
            ledger.write(record)
            analysed += 1
            progress.step(failed=record["status"] not in FINAL_OK)
    progress.close()
    loop_s = time.monotonic() - t_loop
    for actor in actors:
        ray.kill(actor)
    if not args.address:
        ray.shutdown()  # the local Ray this command started
    return {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus, "analysed": analysed,
            "actor_start_s": round(ready_s, 2), "analysis_wall_s": round(loop_s, 2),
            "studies_per_hour": round(analysed / loop_s * 3600.0, 1) if loop_s > 0 else None,
            "worker_deaths": crashes, "workers_replaced": replaced, "studies_per_worker": args.studies_per_worker,
            "peak_rss_mb_per_worker": peak_rss,
            "worker_start_rss_mb": {f"{i['host']}:{i['pid']}": i["rss_mb"] for i in identities}}


def cmd_reanalyse(args: argparse.Namespace) -> int:
    sources = [bool(args.folder), bool(args.study_list), bool(args.dicomweb and not args.study_list)]
    if args.folder and args.dicomweb:
        print("error: give --folder or --dicomweb, not both", file=sys.stderr)
        return 2
    if args.study_list and not args.dicomweb:
        print("error: --study-list needs --dicomweb (the archive to fetch from)", file=sys.stderr)
        return 2
    if sum(sources) != 1:
        print("error: give a source: --dicomweb URL [--query KEY=VALUE ...], --dicomweb URL --study-list FILE, "
              "or --folder DIR", file=sys.stderr)
        return 2
    if bool(args.output_dicomweb) == bool(args.output_folder):
        print("error: give one of --output-dicomweb URL or --output-folder DIR", file=sys.stderr)
        return 2
    model_path = Path(args.model or os.environ.get("HOLOSCAN_MODEL_PATH") or DEFAULT_MODEL_PATH)
    try:
        from paraspinal.model_bundle import BundleError, find_bundle

        model_path = find_bundle(model_path).resolve()  # the actors' working folder is Ray's
        source = _service(args.dicomweb, args.auth_header_file, args.token_file, args.ca_bundle) \
            if args.dicomweb else None
        output = None
        if args.output_dicomweb:
            same = source is not None and args.output_dicomweb.rstrip("/") == source.url.rstrip("/")
            own = args.output_auth_header_file or args.output_token_file or args.output_ca_bundle
            output = source if same and not own else _service(args.output_dicomweb, args.output_auth_header_file,
                                                              args.output_token_file, args.output_ca_bundle)
        _parse_filters(args.query)
    except (ConfigError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_reanalysis(args, source, output, model_path)
