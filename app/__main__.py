"""Command line: ``python -m app run|serve|status|demo|reanalyse``.

``run`` follows the MAP contract: ``-i/-o/-m`` or ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH``.
``serve`` runs the DICOM node configured by the ``node:`` section; ``status`` reads its
state database; ``model list|promote|rollback`` shows or switches the model version the node
uses (``learning.models_dir``); ``demo`` runs archive, node and a synthetic study end to end;
``reanalyse`` re-analyses an archive (QIDO-RS query, study list or folder) on Ray (:mod:`app.reanalyse.cli`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
from pathlib import Path

from app.config import DEFAULT_MODEL_PATH, RESEARCH_USE_STATEMENT, ConfigError, load_config

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _ensure_stack_limit(argv: list[str]) -> None:
    """Holoscan wants a 32 MB stack. Thread stacks are sized from the limit at process start,
    so raise the soft limit and re-execute once when the hard limit allows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = 32 * 1024 * 1024
    if soft == resource.RLIM_INFINITY or soft >= wanted or os.environ.get("PARASPINAL_STACK_RAISED"):
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        return
    resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
    os.environ["PARASPINAL_STACK_RAISED"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "app", *argv])


def _path_arg(value: str | None, env: str, default: str | None) -> Path | None:
    chosen = value or os.environ.get(env) or default
    return Path(chosen) if chosen else None


def cmd_run(args: argparse.Namespace) -> int:
    from app.application import run_batch
    from paraspinal.model_bundle import BundleError

    input_folder = _path_arg(args.input, "HOLOSCAN_INPUT_PATH", "input")
    output_folder = _path_arg(args.output, "HOLOSCAN_OUTPUT_PATH", "output")
    model_path = _path_arg(args.model, "HOLOSCAN_MODEL_PATH", str(DEFAULT_MODEL_PATH))
    if not input_folder.exists():
        print(f"error: input folder {input_folder} does not exist", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        outcomes = run_batch(input_folder, output_folder, model_path, config, args.device)
    except (ConfigError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not outcomes:
        print(f"error: no DICOM study found in {input_folder}", file=sys.stderr)
        return 1
    print(json.dumps(outcomes, indent=2))
    print(RESEARCH_USE_STATEMENT)
    return 0 if all(o["status"] != "failed" for o in outcomes) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the DICOM node until SIGTERM/SIGINT."""
    import signal

    from app.node.logs import setup_logging
    from app.node.service import NodeService
    from paraspinal.model_bundle import BundleError, find_bundle

    model_path = _path_arg(args.model, "HOLOSCAN_MODEL_PATH", str(DEFAULT_MODEL_PATH))
    try:
        config = load_config(args.config)
        setup_logging(args.log_level, hash_uids=config.node.log_uids == "hashed")
        # Fail now, not at the first study, when there is no model; and pin the bundle found.
        model_path = find_bundle(model_path)
    except (ConfigError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    service = NodeService(config, model_path, args.device, args.log_level.upper())
    signal.signal(signal.SIGTERM, lambda *_: service.request_stop())
    signal.signal(signal.SIGINT, lambda *_: service.request_stop())
    try:
        service.start()
    except OSError as exc:  # e.g. the port is taken
        print(f"error: cannot start the node: {exc}", file=sys.stderr)
        service.stop()
        return 1
    try:
        service.wait()
    finally:
        service.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the node's state database: studies and outbox."""
    from app.node.state import StateStore
    from app.node.status import format_status

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    db = config.node.state_db
    if not db.is_file():
        print(f"{'unhealthy: ' if args.health else ''}no node state at {db} (the node has not run with this "
              f"configuration)", file=sys.stderr)
        return 1
    state = StateStore(db, readonly=True)
    try:
        summary = state.summary(recent=args.recent)
    except Exception as exc:  # e.g. the database is locked or damaged
        print(f"{'unhealthy: ' if args.health else ''}cannot read {db}: {exc}", file=sys.stderr)
        return 1
    finally:
        state.close()
    if args.health:
        from app.node.status import health

        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the one line below says it all
        healthy, why = health(config.node, summary["node"])
        print(("healthy: " if healthy else "unhealthy: ") + why)
        return 0 if healthy else 1
    print(json.dumps(summary, indent=2, default=str) if args.json else format_status(summary))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo

    model_path = _path_arg(args.model, "HOLOSCAN_MODEL_PATH", str(DEFAULT_MODEL_PATH))
    return run_demo(Path(args.workdir), model_path, quiet_period_s=args.quiet_period, seed=args.seed,
                    timeout_s=args.timeout)


def cmd_model(args: argparse.Namespace) -> int:
    """List the model versions, or switch the active one (audited)."""
    from app.model_versions import cmd_model as run
    from paraspinal.model_bundle import BundleError

    try:
        config = load_config(args.config)
        return run(args, config, _path_arg(args.model, "HOLOSCAN_MODEL_PATH", str(DEFAULT_MODEL_PATH)))
    except (ConfigError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-l", "--log-level", default=os.environ.get("PARASPINAL_LOG_LEVEL", "INFO"))
    parser.add_argument("--config", help="site configuration YAML (default: $PARASPINAL_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="batch: analyse every study in a folder (MAP contract)")
    run.add_argument("-i", "--input", help="input folder of DICOM files (default $HOLOSCAN_INPUT_PATH or ./input)")
    run.add_argument("-o", "--output", help="output folder (default $HOLOSCAN_OUTPUT_PATH or ./output)")
    run.add_argument("-m", "--model", help="model bundle or models folder (default $HOLOSCAN_MODEL_PATH or ./models)")
    run.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    run.set_defaults(func=cmd_run)
    serve = sub.add_parser("serve", help="run the DICOM node (C-STORE in, analysis, C-STORE out)")
    serve.add_argument("-m", "--model", help="model bundle or models folder (default $HOLOSCAN_MODEL_PATH or ./models)")
    serve.add_argument("--device", help="torch device for the workers (default: cuda when available)")
    serve.set_defaults(func=cmd_serve)
    status = sub.add_parser("status", help="show the node's studies and outbox (reads its state database)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--recent", type=int, default=20, help="how many recent studies to list")
    status.add_argument("--health", action="store_true",
                        help="exit 0 when the node is healthy (fresh heartbeat, a worker ready to analyse, listener "
                             "answers C-ECHO), else 1")
    status.set_defaults(func=cmd_status)
    model = sub.add_parser("model", help="model versions: list, promote a site version, roll back")
    model.add_argument("-m", "--model", help="the shipped bundle or models folder (default $HOLOSCAN_MODEL_PATH or ./models)")
    model_sub = model.add_subparsers(dest="action", required=True)
    model_sub.add_parser("list", help="shipped and site versions with their gate results; * marks the active one")
    promote = model_sub.add_parser("promote", help="make a version active (from the node's next study on)")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="promote a version the gate refused (audited as forced)")
    model_sub.add_parser("rollback", help="return to the version active before the current one")
    model.set_defaults(func=cmd_model)
    demo = sub.add_parser("demo", help="end to end on this machine: archive + node + synthetic study")
    demo.add_argument("--workdir", default="build/demo",
                      help="folder for the demo's files (its node/, archive/, study/ and logs/ are recreated)")
    demo.add_argument("-m", "--model", help="model bundle or models folder (default $HOLOSCAN_MODEL_PATH or ./models)")
    demo.add_argument("--quiet-period", type=float, default=2.0, help="the node's quiet period for the demo, s")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic study")
    demo.add_argument("--timeout", type=float, default=900.0, help="give up after this long, s")
    demo.set_defaults(func=cmd_demo)
    from app.reanalyse.cli import add_parser as add_reanalyse

    add_reanalyse(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    # highdicom logs every module it copies at INFO: noise in an unattended node's log.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    return args.func(args)


if __name__ == "__main__":
    _ensure_stack_limit(sys.argv[1:])
    sys.exit(main())
