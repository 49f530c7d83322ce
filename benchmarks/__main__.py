"""``python -m benchmarks [run] ...`` (``make bench``) and ``python -m benchmarks ab ...``.

``run`` writes ``<out>/latest.json`` and ``<out>/latest.md`` (``--out``, default
``benchmarks/results``) and prints the markdown. ``--quick`` runs every suite once on a tiny
synthetic study (the smoke test's setting; the figures mean nothing). GPU suites run when
``torch.cuda.is_available()``; otherwise the tables say "not measured (no GPU lent)".
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
import traceback
from pathlib import Path

from benchmarks.data import DATA_DIR
from benchmarks.machine import ROOT, load_average, machine_info

SUITES = ("inference", "stages", "e2e", "ingest", "concurrency")
OPTIONAL_SUITES = ("parts",)  # run only when named in --suites
DEFAULT_MODEL = ROOT / "models"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_info(model: Path) -> dict:
    """Which bundle the figures came from (name, version, weights hash)."""
    from paraspinal.model_bundle import TORCHSCRIPT_RELPATH, _sha256, find_bundle, read_metadata

    bundle = find_bundle(model)
    metadata = read_metadata(bundle)
    return {"path": str(bundle), "name": metadata.get("name"), "version": metadata.get("version"),
            "weights_sha256": _sha256(bundle / TORCHSCRIPT_RELPATH)}


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.data import get_study
    from benchmarks.report import to_markdown

    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = set(suites) - set(SUITES) - set(OPTIONAL_SUITES)
    if unknown:
        print(f"error: unknown suite(s) {', '.join(sorted(unknown))}; known: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if args.quick:
        args.study, args.repeats, args.real, args.ingest_rounds, args.ingest_copies = "tiny", 1, False, 2, 1
        args.concurrency_rounds, args.senders = 1, 2
    gpu = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if gpu and not args.cpu_only else [])
    work = Path(args.workdir).resolve()
    model = Path(args.model).resolve()
    tree = Path(args.tree).resolve()
    results: dict = {"label": args.label, "command": "python -m benchmarks " + " ".join(map(shlex.quote, sys.argv[1:])),
                     "machine": machine_info(), "model": model_info(model), "node_tree": str(tree), "errors": []}
    _log(f"benchmarks: suites {', '.join(suites)}; devices {', '.join(devices)}; load {load_average()}")
    data_dir = Path(args.data_dir).resolve()
    study = get_study(args.study, data_dir)

    def attempt(name: str, fn):
        _log(f"[{name}]")
        try:
            return fn()
        except Exception as exc:  # one failing suite must not lose the others' figures
            _log(traceback.format_exc())
            results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            return None

    if "inference" in suites:
        from benchmarks.inference import bench_series

        names = [args.study] + (["musclemap_sub0001", "myosegmentum_tum01"] if args.real else [])
        results["inference"] = []
        for device in devices:
            for name in names:
                entry = attempt(f"inference {name} {device}", lambda: bench_series(
                    get_study(name, data_dir), model, device, args.repeats,
                    Path(args.out) if args.torch_profile else None))
                if entry:
                    for row in entry["stacks"]:
                        _log(f"  {name} stack {row['stack']} on {device}: network {row['network_median_s']} s, "
                             f"segmentation step {row['segment_stack_median_s']} s")
                    results["inference"].append(entry)
    if "parts" in suites:
        from benchmarks.parts import run_parts

        results["parts"] = attempt("parts", lambda: run_parts(study, model, max(3, args.repeats), log=_log))
    if "stages" in suites:
        from benchmarks.stages import load_for, stage_medians

        results["stages"] = attempt("stages", lambda: dict(study=study.name, **stage_medians(
            study.folder, load_for(model, "cpu"), args.repeats)))
    if "e2e" in suites:
        from benchmarks.nodebench import run_e2e

        results["e2e"] = []
        for device in devices:
            entry = attempt(f"e2e {device}", lambda: run_e2e(study, work / f"e2e_{device}", model, args.repeats,
                                                               device, args.quiet_period, tree, log=_log,
                                                               threads=args.node_threads))
            if entry:
                results["e2e"].append(entry)
    if "ingest" in suites:
        from benchmarks.nodebench import run_ingest

        results["ingest"] = attempt("ingest", lambda: run_ingest(study, work / "ingest", model, args.ingest_rounds,
                                                                 args.ingest_copies, tree, log=_log,
                                                                 baseline_tree=args.ingest_baseline_tree))
    if "concurrency" in suites:
        from benchmarks.nodebench import run_concurrency

        results["concurrency"] = attempt("concurrency", lambda: run_concurrency(
            study, work / "concurrency", model, args.senders, args.concurrency_rounds, devices[-1],
            args.quiet_period, tree, args.workers, log=_log))
    results["load_average_at_end"] = load_average()
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    markdown = to_markdown(results)
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)
    _log(f"written: {out / (args.name + '.json')}, {out / (args.name + '.md')}")
    if results["errors"]:
        _log("errors: " + "; ".join(results["errors"]))
        return 1
    return 0


def cmd_ab(args: argparse.Namespace) -> int:
    from benchmarks.ab import compare, markdown
    from benchmarks.data import get_study

    get_study(args.study, Path(args.data_dir))  # written once, by this process
    result = compare(Path(args.baseline_tree).resolve(), Path(args.tree).resolve(), args.study,
                     Path(args.model).resolve(), args.rounds, data_dir=Path(args.data_dir).resolve(), log=_log)
    result["machine"] = machine_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the suites, write JSON + markdown (the default command)")
    run.add_argument("--suites", default=",".join(SUITES),
                     help=f"comma-separated, of {', '.join(SUITES)} (default: all of them) and "
                          f"{', '.join(OPTIONAL_SUITES)}")
    run.add_argument("--quick", action="store_true", help="tiny study, one repeat: a smoke run, not a measurement")
    run.add_argument("--study", default="syn512", help="benchmark study (benchmarks/data.py), default syn512")
    run.add_argument("--no-real", dest="real", action="store_false", help="inference: skip the real shared cases")
    run.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median reported)")
    run.add_argument("--quiet-period", type=float, default=1.0, help="the node's quiet period, s (subtracted)")
    run.add_argument("--ingest-rounds", type=int, default=6, help="alternating rounds node/storescp")
    run.add_argument("--ingest-copies", type=int, default=2, help="copies of the study per ingest round")
    run.add_argument("--ingest-baseline-tree", type=Path, default=None,
                     help="ingest: a second node from this source tree takes its turn too (side-by-side A/B)")
    run.add_argument("--senders", type=int, default=4, help="concurrent senders")
    run.add_argument("--concurrency-rounds", type=int, default=1)
    run.add_argument("--workers", type=int, default=1, help="the node's worker processes in the concurrency suite")
    run.add_argument("--cpu-only", action="store_true", help="skip the GPU even when there is one")
    run.add_argument("--node-threads", type=int, default=None,
                     help="e2e: OMP/MKL/ITK threads of the node's workers (default: the libraries' own, one per core)")
    run.add_argument("--torch-profile", action="store_true", help="write torch profiler tables next to the results")
    run.add_argument("--model", default=str(DEFAULT_MODEL), help="model bundle or models folder")
    run.add_argument("--tree", default=str(ROOT), help="source tree the node runs from (default: this one)")
    run.add_argument("--workdir", default=str(ROOT / "build" / "bench" / "work"), help="scratch folder")
    run.add_argument("--data-dir", default=str(DATA_DIR), help="where the benchmark studies are written once")
    run.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where JSON and markdown go")
    run.add_argument("--name", default="latest", help="file name stem of the results (default latest)")
    run.add_argument("--label", default="", help="free text stored with the results (e.g. what changed)")
    run.set_defaults(func=cmd_run)
    ab = sub.add_parser("ab", help="compare the stages of two source trees, alternating runs")
    ab.add_argument("--baseline-tree", required=True)
    ab.add_argument("--tree", default=str(ROOT), help="the tree compared with the baseline (default: this one)")
    ab.add_argument("--study", default="syn512")
    ab.add_argument("--rounds", type=int, default=5)
    ab.add_argument("--model", default=str(DEFAULT_MODEL))
    ab.add_argument("--data-dir", default=str(DATA_DIR), help="where the benchmark studies are written once")
    ab.add_argument("--out", default=str(ROOT / "build" / "bench" / "ab"))
    ab.add_argument("--name", default="ab")
    ab.set_defaults(func=cmd_ab)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "ab", "-h", "--help"):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.ERROR)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
