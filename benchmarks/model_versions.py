"""CPU (and GPU) time of the segmentation step per series for several model bundles, side by side.

Each round runs every bundle once on the same stacks (``segment_stack``: preprocessing excluded,
network incl. test-time mirroring where the bundle uses it, mapping back, post-processing), in
alternating order, after one warm-up each; the figure is the median over rounds, and the ratio to
the first bundle is the median of the per-round ratios (robust to a busy, shared machine).

Usage::

    python -m benchmarks.model_versions --bundle 0.2.0=output/bundles/v0.2.0 \\
        --bundle 0.3.0=models/paraspinal_t2ax [--study syn512] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.data import get_study
from benchmarks.inference import _timed, load_volumes
from benchmarks.machine import load_average
from paraspinal.model_bundle import load_bundle
from paraspinal.segmentation import segment_stack, to_model_space


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_versions", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", action="append", required=True, help="NAME=PATH (repeatable; first = reference)")
    p.add_argument("--study", default="syn512")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    study = get_study(args.study)
    volumes = load_volumes(study)
    bundles = []
    for spec in args.bundle:
        name, _, path = spec.partition("=")
        bundle = load_bundle(Path(path), args.device)
        inputs = [to_model_space(v, bundle) for v in volumes]
        for v, i in zip(volumes, inputs):  # warm-up (TorchScript optimises during the first calls)
            segment_stack(v, bundle, i)
        bundles.append((name, bundle, inputs))
    times: dict[str, list[float]] = {name: [] for name, _, _ in bundles}
    load_before = load_average()
    for r in range(args.rounds):
        order = bundles if r % 2 == 0 else bundles[::-1]
        for name, bundle, inputs in order:
            times[name].append(sum(_timed(lambda: segment_stack(v, bundle, i), bundle.device)
                                   for v, i in zip(volumes, inputs)))
    reference = bundles[0][0]
    rows = []
    for name, bundle, _ in bundles:
        ratios = [t / ref for t, ref in zip(times[name], times[reference])]
        rows.append({"bundle": name, "version": bundle.version, "test_time_mirror": bundle.test_time_mirror,
                     "median_s": round(statistics.median(times[name]), 2), "runs_s": [round(t, 2) for t in times[name]],
                     f"ratio_to_{reference}": round(statistics.median(ratios), 2)})
    result = {"study": study.name, "description": study.description, "device": args.device,
              "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
              "load_average_before": load_before, "load_average_after": load_average(), "bundles": rows}
    for row in rows:
        print(f"{row['bundle']:>10} (mirror {row['test_time_mirror']}): median {row['median_s']} s per series, "
              f"x{row[f'ratio_to_{reference}']} of {reference}")
    print(f"{study.name}: {study.description}; {args.device}, {torch.get_num_threads()} threads; load average "
          f"before {load_before}, after {result['load_average_after']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
