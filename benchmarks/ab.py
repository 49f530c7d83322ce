"""Side-by-side comparison of two source trees on the same input, alternating runs.

On a shared machine absolute times drift with other people's jobs; a ratio of runs taken
alternately (A B A B ...) under the same load is what says whether a change helped.

``python -m benchmarks ab --baseline-tree DIR [--study syn512] [--rounds 5]`` runs the
pipeline's stages in-process (:mod:`benchmarks.stages`) in a fresh interpreter for each tree
and run, and reports per-stage medians of both trees and the median of the per-round ratios
(current / baseline; below 1 is faster).

A baseline tree is any copy of the project, e.g. the committed state::

    mkdir -p /tmp/base && git archive HEAD | tar -x -C /tmp/base
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.machine import ROOT, load_average

CHILD = """
import json, sys, logging
logging.disable(logging.WARNING)
from pathlib import Path
from benchmarks.data import get_study
from benchmarks.stages import run_stages, load_for
bundle = load_for(Path(sys.argv[2]), "cpu")
folder = get_study(sys.argv[1], Path(sys.argv[3])).folder
run_stages(folder, bundle)  # warm-up
times, job = run_stages(folder, bundle)
print("BENCH-JSON " + json.dumps({k: round(v, 4) for k, v in times.items()}))
"""


def run_child(tree: Path, study: str, model: Path, data_dir: Path) -> dict:
    """One warm-up and one timed in-process run of every stage, with ``tree``'s code."""
    # The tree's packages come first (the child's working directory); this harness second.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD, study, str(model), str(data_dir)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-JSON "):
            return json.loads(line[len("BENCH-JSON "):])
    raise RuntimeError(f"stage run in {tree} failed:\n{proc.stderr[-3000:]}")


def compare(baseline: Path, current: Path, study: str, model: Path, rounds: int, data_dir: Path,
            log=print) -> dict:
    runs: dict[str, list[dict]] = {"baseline": [], "current": []}
    loads = []
    for r in range(rounds):
        order = [("baseline", baseline), ("current", current)]
        if r % 2:
            order.reverse()
        for name, tree in order:
            loads.append(load_average())
            runs[name].append(run_child(tree, study, model, data_dir))
        b, c = runs["baseline"][-1], runs["current"][-1]
        log(f"  round {r + 1}/{rounds}: total baseline {sum(b.values()):.2f} s, current {sum(c.values()):.2f} s "
            f"(load {loads[-1][0] if loads[-1] else '?'})")
    stages = list(runs["baseline"][0])
    summary = {}
    for stage in stages + ["total"]:
        pick = (lambda run: sum(run.values())) if stage == "total" else (lambda run, s=stage: run[s])
        base = [pick(run) for run in runs["baseline"]]
        cur = [pick(run) for run in runs["current"]]
        ratios = [c / b for b, c in zip(base, cur) if b > 0]
        summary[stage] = {"baseline_median_s": round(statistics.median(base), 3),
                          "current_median_s": round(statistics.median(cur), 3),
                          "median_ratio": round(statistics.median(ratios), 3) if ratios else None}
    return {"study": study, "baseline_tree": str(baseline), "current_tree": str(current), "rounds": rounds,
            "model": str(model), "summary": summary, "runs": runs, "load_averages": loads}


def markdown(result: dict) -> str:
    lines = [f"A/B on `{result['study']}`, {result['rounds']} alternating rounds, in-process stages "
             f"(baseline `{result['baseline_tree']}`, current `{result['current_tree']}`); load average 1 min "
             f"{min(l[0] for l in result['load_averages'] if l)}-{max(l[0] for l in result['load_averages'] if l)}",
             "", "| stage | baseline median s | current median s | median ratio current/baseline |",
             "|---|---:|---:|---:|"]
    for stage, row in result["summary"].items():
        lines.append(f"| {stage} | {row['baseline_median_s']} | {row['current_median_s']} | {row['median_ratio']} |")
    return "\n".join(lines) + "\n"
