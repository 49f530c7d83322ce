"""Cost of candidate network architectures, side by side: parameters, CPU time of the network
on one series and of one training step (issue 11, item 4: capacity and context against CPU time).

Times the network alone, with freshly initialised weights (cost does not depend on the weights;
nothing here is a model). One series = 50 axial slices of a 512x512, 0.5 mm acquisition, i.e.
50 windows of 256x256 in the 1 mm model space, run in batches of 16 as the application's
sliding-window inferer does, twice when test-time mirroring is on (as in bundle 0.3.0). One
training step = forward + backward + AdamW on a batch of 4 windows. Rounds alternate the
architectures; figures are medians, and ratios to the first architecture are medians of the
per-round ratios (robust on a busy, shared machine).

Usage::

    python -m benchmarks.network_cost [--rounds 3] [--threads 2] [--out benchmarks/results/network_cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.machine import load_average
from training.network import build_network, network_def

ARCHITECTURES: dict[str, dict] = {
    "2D 16-256 (0.2.0/0.3.0)": {"channels": (16, 32, 64, 128, 256), "in_channels": 1},
    "2.5D 16-256 (3 slices)": {"channels": (16, 32, 64, 128, 256), "in_channels": 3},
    "2D 32-512": {"channels": (32, 64, 128, 256, 512), "in_channels": 1},
    "2D 64-1024 (MuscleMap width)": {"channels": (64, 128, 256, 512, 1024), "in_channels": 1},
}
SLICES, WINDOW, SW_BATCH, TRAIN_BATCH = 50, 256, 16, 4


def _series_seconds(network: torch.nn.Module, in_channels: int, mirror: bool) -> float:
    x = torch.randn(SW_BATCH, in_channels, WINDOW, WINDOW)
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(2 if mirror else 1):
            for start in range(0, SLICES, SW_BATCH):
                network(x[: min(SW_BATCH, SLICES - start)])
    return time.perf_counter() - started


def _train_step_seconds(network: torch.nn.Module, in_channels: int) -> float:
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    x = torch.randn(TRAIN_BATCH, in_channels, WINDOW, WINDOW)
    network.train()
    network(x).mean().backward()  # warm-up (allocations)
    optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    network(x).mean().backward()
    optimizer.step()
    elapsed = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)
    network.eval()
    return elapsed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.network_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-mirror", action="store_true", help="one pass per series (no test-time mirroring)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    networks = {}
    for name, arch in ARCHITECTURES.items():
        networks[name] = build_network(network_def(arch["channels"], in_channels=arch["in_channels"])).eval()
        _series_seconds(networks[name], arch["in_channels"], mirror=False)  # warm-up
    series: dict[str, list[float]] = {name: [] for name in ARCHITECTURES}
    steps: dict[str, list[float]] = {name: [] for name in ARCHITECTURES}
    for round_index in range(args.rounds):
        order = list(ARCHITECTURES) if round_index % 2 == 0 else list(reversed(ARCHITECTURES))
        for name in order:
            arch = ARCHITECTURES[name]
            series[name].append(_series_seconds(networks[name], arch["in_channels"], mirror=not args.no_mirror))
            steps[name].append(_train_step_seconds(networks[name], arch["in_channels"]))
    reference = next(iter(ARCHITECTURES))
    rows = []
    for name in ARCHITECTURES:
        rows.append({
            "architecture": name,
            "parameters": sum(t.numel() for t in networks[name].parameters()),
            "network_s_per_series": round(statistics.median(series[name]), 2),
            "ratio_series": round(statistics.median(a / b for a, b in zip(series[name], series[reference])), 2),
            "train_step_s": round(statistics.median(steps[name]), 3),
            "ratio_train_step": round(statistics.median(a / b for a, b in zip(steps[name], steps[reference])), 2),
        })
    figures = {
        "what": f"network only, {SLICES} windows {WINDOW}x{WINDOW} per series "
                f"({'one pass' if args.no_mirror else 'two passes: test-time mirroring'}), training step batch "
                f"{TRAIN_BATCH}; CPU, torch {torch.get_num_threads()} threads, {args.rounds} alternating rounds",
        "load_average": load_average(),
        "rows": rows,
    }
    print(figures["what"], "| load average", figures["load_average"])
    print(f"{'architecture':32s} {'params':>10s} {'net s/series':>12s} {'x':>6s} {'train s/step':>12s} {'x':>6s}")
    for r in rows:
        print(f"{r['architecture']:32s} {r['parameters']:>10d} {r['network_s_per_series']:>12.2f} "
              f"{r['ratio_series']:>6.2f} {r['train_step_s']:>12.3f} {r['ratio_train_step']:>6.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
