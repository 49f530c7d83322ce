"""The long reliability run behind ``make soak``: load, repeated crashes, an outage, SIGTERM, fuzz.

    python -m reliability.soak [--studies 20] [--cycles 6] [--fuzz-cases 10000] [--wire 500]
                               [--workdir build/soak]

Phases, each against ``python -m app serve`` and the project's archive as PACS on loopback
(all started and stopped here, bounded by timeouts):

1. **load**: ``--studies`` studies of 32 instances, every study spread over 8 associations
   from 8 SCU processes, all open before any sends; 2 workers;
2. **crash**: ``--cycles`` times :func:`reliability.harness.crash_cycle` (SIGKILL of the node's
   process group during reception and analysis, then during sending to a slow archive; the
   interrupted study re-sent whole, as a PACS would);
3. **outage**: the archive is down while 3 studies are analysed; results wait in the outbox,
   are delivered when it comes back 8 s later; a second destination that never comes up
   ends as dead letters;
4. **sigterm**: SIGTERM during an analysis with a short grace, restart, completion;
5. **fuzz**: ``--fuzz-cases`` in-process cases (:mod:`reliability.fuzz`), then ``--wire`` cases
   over DICOM against a running node process (which also analyses what it accepted).

Prints one row per phase and a total: instances sent, acknowledged, stored, analysed,
results expected and delivered, duplicate result sets (a study's SEG/SR objects arriving
under a second set of SOP Instance UIDs: must be 0), re-sent instances (a result sent again
after a crash with the same SOP Instance UID and bytes: idempotent at a PACS, counted apart),
lost (must be 0), crashes survived, fuzz cases tried. Exit status 1 when anything was lost,
a study got a second result set, or a check failed. The table is also written to
``<workdir>/summary.txt``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from app.config import PROJECT_ROOT
from app.node.net import echo, free_tcp_port
from reliability import fuzz
from reliability.harness import (
    HOST,
    StudyAccount,
    account,
    crash_cycle,
    find_model,
    format_accounts,
    load_run,
    make_study,
    node_status,
    node_with_archive,
    start_archive,
    start_node,
    wait_until,
)
from reliability.scu import send_files


@dataclass
class Phase:
    name: str
    sent: int = 0
    acknowledged: int = 0
    stored: int = 0
    analysed: int = 0
    results: int = 0
    delivered: int = 0
    duplicate_sets: int = 0   # result sets beyond one per study at the archive (must be 0)
    resent: int = 0           # instances received again with the same UID and bytes (idempotent)
    lost: int = 0
    crashes: int = 0
    fuzz_cases: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, accounts: Sequence[StudyAccount]) -> None:
        for a in accounts:
            self.sent += a.sent
            self.acknowledged += a.acknowledged
            self.stored += a.stored
            self.analysed += a.analysed
            self.results += a.outputs
            self.delivered += a.delivered
            self.duplicate_sets += a.duplicate_result_sets
            self.resent += a.duplicates
            self.lost += a.lost
            if a.status != "done" or a.foreign or a.changed_duplicates or a.result_sets != 1:
                self.errors.append(f"study {a.study_uid}: status {a.status}, result sets {a.result_sets}, "
                                   f"foreign {a.foreign}, changed duplicates {a.changed_duplicates}")


def _statuses(acknowledged, studies):
    return {p: 0 if p in acknowledged else None for s in studies for p in s.paths}


def phase_load(root: Path, model: Path, n_studies: int) -> Phase:
    phase = Phase("load")
    run = load_run(root, model, n_studies, seed=1000)
    phase.add(run.accounts)
    phase.notes.append(f"{n_studies} studies x 32 instances over 8 associations (max open at once: {run.overlap})")
    if run.overlap < 8:
        phase.errors.append(f"only {run.overlap} associations overlapped")
    print(format_accounts(run.accounts), flush=True)
    return phase


def phase_crash(root: Path, model: Path, cycles: int) -> Phase:
    phase = Phase("crash")
    studies, acknowledged = [], set()
    with node_with_archive(root, model, store_delay_s=0.7, quiet_period_s=3.0, workers=1, send_retries=50,
                           send_backoff_s=0.5, send_backoff_max_s=2.0) as rig:
        for i in range(cycles):
            cycle = crash_cycle(rig.node, rig.archive, root, seed=2000 + 10 * i)
            rig.node = cycle.node
            studies += cycle.studies
            acknowledged |= cycle.acknowledged
            phase.crashes += cycle.kills
            print(f"  crash cycle {i + 1}/{cycles}: killed during reception ({cycle.partial_acks} of Y acknowledged) "
                  f"and analysis, then during sending ({cycle.delivered_before_second_kill} result(s) out); "
                  f"both studies delivered", flush=True)
        accounts = account(rig.node, rig.archive, studies, _statuses(acknowledged, studies))
        phase.add(accounts)
        print(format_accounts(accounts), flush=True)
        phase.notes.append(f"{cycles} cycles x 2 SIGKILLs of the process group; "
                           f"{sum(a.duplicates for a in accounts)} result(s) re-sent with the same UID after a kill "
                           f"(idempotent), {sum(a.duplicate_result_sets for a in accounts)} duplicate result set(s)")
    return phase


def phase_outage(root: Path, model: Path) -> Phase:
    phase = Phase("outage")
    port, never = free_tcp_port(), free_tcp_port()
    node = start_node(root / "node", model, quiet_period_s=1.0, send_retries=12, send_backoff_s=0.5,
                      send_backoff_max_s=2.0, wait_ready=False,
                      destinations=[{"ae_title": "PACS", "host": HOST, "port": port},
                                    {"ae_title": "NEVER", "host": HOST, "port": never}])
    archive = None
    try:
        studies = [make_study(root / f"s{i}", seed=3000 + i, n_slices=4) for i in range(3)]
        statuses = {}
        for study in studies:
            statuses.update(send_files(study.paths, node.port, "SCU"))
        wait_until(lambda: all((rows := node.outbox(s.study_uid)) and all(r["attempts"] >= 1 for r in rows)
                               for s in studies), 300, "every result tried", interval_s=0.5, alive=node.alive)
        time.sleep(8.0)
        waiting = sum(1 for s in studies for r in node.outbox(s.study_uid) if r["status"] == "pending")
        archive = start_archive(root / "archive", ae_title="PACS", port=port)
        wait_until(lambda: all(r["status"] in ("sent", "dead") for s in studies for r in node.outbox(s.study_uid)),
                   300, "sent or dead", interval_s=0.5, alive=node.alive)
        rows = [r for s in studies for r in node.outbox(s.study_uid)]
        dead = [r for r in rows if r["status"] == "dead"]
        if any(not r["destination"].startswith("NEVER@") for r in dead) or not dead:
            phase.errors.append("dead letters other than the destination that never came up")
        if "Dead letters" not in node_status(node).stdout:
            phase.errors.append("python -m app status shows no dead letters")
        accounts = account(node, archive, studies, statuses)
        phase.add(accounts)
        print(format_accounts(accounts), flush=True)
        phase.notes.append(f"{waiting} result(s) waited in the outbox for 8+ s; {len(dead)} dead letter(s) to NEVER")
    finally:
        node.stop()
        if archive is not None:
            archive.stop()
    return phase


def phase_sigterm(root: Path, model: Path) -> Phase:
    phase = Phase("sigterm")
    with node_with_archive(root, model, quiet_period_s=1.0, shutdown_grace_s=0.3) as rig:
        node = rig.node
        study = make_study(root / "study", seed=4000, n_slices=8)
        statuses = dict(send_files(study.paths, node.port, "SCU"))
        wait_until(lambda: (node.study(study.study_uid) or {}).get("status") == "processing", 120, "analysis",
                   interval_s=0.1, alive=node.alive)
        time.sleep(0.5)
        node.process.send_signal(signal.SIGTERM)
        code = node.process.wait(timeout=60)
        node.stop()
        if code != 0 or node.study(study.study_uid)["status"] != "processing":
            phase.errors.append(f"SIGTERM: exit {code}, study {node.study(study.study_uid)['status']}")
        node = rig.restart(wait_ready=False)
        node.wait_delivered(study.study_uid, 300)
        accounts = account(node, rig.archive, [study], statuses)
        phase.add(accounts)
        print(format_accounts(accounts), flush=True)
        phase.notes.append("SIGTERM during analysis (grace 0.3 s), exit 0, completed after restart")
    return phase


def phase_fuzz(root: Path, model: Path, cases: int, wire: int, seed_value: int) -> Phase:
    phase = Phase("fuzz")
    start = time.monotonic()
    corpus = fuzz.build_corpus(root / "corpus")
    stats = fuzz.run_in_process(root / "inproc", corpus, cases, seed_value=seed_value)
    if wire:
        node = start_node(root / "node", model, quiet_period_s=2.0, wait_ready=False, max_dataset_mb=8)
        try:
            drawn = fuzz.draw_cases(corpus, wire, seed_value)
            statuses = fuzz.send_raw_cases(node.port, drawn, root)
            fuzz.check_wire_results(drawn, statuses, 8 * 1024 * 1024, stats)
            refused = sum(1 for s in statuses if s not in (0, None))
            wait_until(lambda: node.summary()["studies"]["receiving"] == 0 and node.summary()["studies"]["queued"] == 0
                       and node.summary()["studies"]["processing"] == 0, 600, "the node analysing what it accepted",
                       interval_s=1.0, alive=node.alive)
            logged = len(node.events("store_refused"))
            if logged != refused:
                stats.failures.append(f"wire: {refused} refusals, {logged} store_refused lines")
            if not node.alive() or echo(HOST, node.port, "PARASPINAL", "HEALTHCHECK") != 0:
                stats.failures.append("wire: the node died or stopped answering")
            fuzz.verify_spool(root / "node" / "spool", stats)
            summary = node.summary()["studies"]
            phase.notes.append(f"node analysed {summary['done']} accepted fuzz study(ies) done, {summary['failed']} "
                               f"failed (kept with reason), and kept serving")
        finally:
            node.stop()
    phase.fuzz_cases = stats.total
    phase.errors += stats.failures
    print(fuzz.format_stats(stats, time.monotonic() - start), flush=True)
    return phase


def format_table(phases: Sequence[Phase], parameters: str) -> str:
    cols = ["sent", "acknowledged", "stored", "analysed", "results", "delivered", "duplicate_sets", "resent", "lost",
            "crashes", "fuzz_cases"]
    heads = ["phase", "inst sent", "acked", "stored", "analysed", "results", "delivered", "dup result sets",
             "re-sent (same UID)", "lost", "crashes", "fuzz cases", "time s"]
    rows = [[p.name] + [str(getattr(p, c)) for c in cols] + [f"{p.seconds:.0f}"] for p in phases]
    total = Phase("TOTAL")
    for p in phases:
        for c in cols + ["seconds"]:
            setattr(total, c, getattr(total, c) + getattr(p, c))
    rows.append([total.name] + [str(getattr(total, c)) for c in cols] + [f"{total.seconds:.0f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [parameters, "", line(heads), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("  dup result sets: a second set of SEG/SR objects (new UIDs) for a study, must be 0; re-sent: a "
               "result sent again after a crash with the same SOP Instance UID and bytes (idempotent at a PACS)")
    for p in phases:
        for note in p.notes:
            out.append(f"  {p.name}: {note}")
        for error in p.errors:
            out.append(f"  {p.name}: ERROR {error}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20, help="studies in the load phase (32 instances each)")
    parser.add_argument("--cycles", type=int, default=6, help="crash cycles (2 SIGKILLs each)")
    parser.add_argument("--fuzz-cases", type=int, default=10000, help="in-process fuzz cases")
    parser.add_argument("--wire", type=int, default=500, help="fuzz cases over DICOM to a node process")
    parser.add_argument("--seed", type=int, default=None, help="fuzz seed (default: from the clock, printed)")
    parser.add_argument("--workdir", default=str(PROJECT_ROOT / "build" / "soak"))
    parser.add_argument("--keep", action="store_true", help="keep the working files of each phase")
    args = parser.parse_args(argv)
    model = find_model()
    if model is None:
        print("error: no model bundle (models/paraspinal_t2ax or $PARASPINAL_TEST_MODEL)", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    os.environ["RUST_BACKTRACE"] = "0"  # codec panics found by the fuzzer are counted, not dumped
    logging.basicConfig(level=logging.CRITICAL)
    for name in ("pydicom", "pynetdicom", "paraspinal"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    seed_value = args.seed if args.seed is not None else int(time.time()) % 100000
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    parameters = (f"soak: load {args.studies} studies x 32 instances over 8 associations; {args.cycles} crash cycles "
                  f"(2 SIGKILLs each); outage 3 studies, 8 s down + 1 never-up destination; SIGTERM 1 study; "
                  f"fuzz {args.fuzz_cases} in-process + {args.wire} over DICOM (seed {seed_value}); "
                  f"model {model.name}; workdir {workdir}")
    print(parameters, flush=True)
    plan = [("load", lambda d: phase_load(d, model, args.studies)),
            ("crash", lambda d: phase_crash(d, model, args.cycles)),
            ("outage", lambda d: phase_outage(d, model)),
            ("sigterm", lambda d: phase_sigterm(d, model)),
            ("fuzz", lambda d: phase_fuzz(d, model, args.fuzz_cases, args.wire, seed_value))]
    phases = []
    for name, run in plan:
        print(f"\n== {name}", flush=True)
        start = time.monotonic()
        try:
            phase = run(workdir / name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            phase = Phase(name, errors=[f"{type(exc).__name__}: {exc}"])
            traceback.print_exc()
        phase.seconds = time.monotonic() - start
        phases.append(phase)
        if not args.keep and not phase.errors:
            shutil.rmtree(workdir / name, ignore_errors=True)
    table = format_table(phases, parameters)
    print("\n" + table)
    (workdir / "summary.txt").write_text(table + "\n")
    failed = any(p.errors or p.lost or p.duplicate_sets for p in phases)
    print("\nsoak: " + ("FAILED" if failed else "passed: nothing lost, every check held"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
