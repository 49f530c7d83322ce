"""Average the weights of bundles of one network (a "model soup" of runs in the same basin, e.g. a
run and its warm restart): one model, so inference costs what a single model costs.

Only meaningful for runs that share a start (a checkpoint and its continuation); independent
seeds lie in different basins and their average is not a model. The output bundle is a copy of
the first bundle with the averaged TorchScript weights and a note in its metadata.

Usage: python -m training.average_weights BUNDLE BUNDLE [BUNDLE ...] --out FOLDER
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch

from paraspinal.model_bundle import read_metadata
from training.export import write_metadata

MODEL_FILE = Path("models") / "model.ts"


def average_bundles(bundles: Sequence[Path], out: Path) -> Path:
    """Write ``out``: the first bundle with the element-wise mean of all bundles' floating-point
    weights (integer buffers are taken from the first). Raises ValueError when the networks differ."""
    if len(bundles) < 2:
        raise ValueError("need at least two bundles to average")
    models = [torch.jit.load(str(Path(b) / MODEL_FILE), map_location="cpu") for b in bundles]
    states = [m.state_dict() for m in models]
    for bundle, state in zip(bundles[1:], states[1:]):
        if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
            raise ValueError(f"{bundle}: its network differs from {bundles[0]}'s; only one network's runs average")
    mean = {k: (torch.stack([s[k].double() for s in states]).mean(0).to(states[0][k].dtype)
                if states[0][k].is_floating_point() else states[0][k]) for k in states[0]}
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundles[0], out)
    models[0].load_state_dict(mean)
    torch.jit.save(models[0], str(out / MODEL_FILE))
    metadata = read_metadata(out)
    metadata["weights_average"] = {
        "of": [str(b) for b in bundles],
        "sha256": [hashlib.sha256((Path(b) / MODEL_FILE).read_bytes()).hexdigest() for b in bundles],
    }
    write_metadata(out, metadata)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.average_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        print(average_bundles(args.bundles, args.out))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
