"""Train the 2D paraspinal muscle UNet and export it as a bundle.

Recipe (Wesselink et al., adapted to CPU): MONAI UNet 2D, DiceCE loss (marginal for
partially labelled cases, :mod:`training.losses`), AdamW lr 1e-3 weight decay 1e-4,
seed 0, 256x256 patches of axial 1x1 mm model-space slices.

Example::

    python -m training.train --out output/train/fold_a --cases musclemap_sub0001 \\
        --synthetic 12 --holdout myosegmentum_tum01 --iterations 1500 \\
        --export models/paraspinal_t2ax

Reproducibility: every "epoch" is ``--checkpoint-every`` iterations; its sample order and
augmentation are seeded from (seed, epoch), and a checkpoint is written at each epoch
end, so ``--resume`` continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import monai
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.utils import set_determinism
from tqdm import tqdm

from paraspinal.model_bundle import METADATA_RELPATH, read_metadata
from training.data import (MASKED_BACKGROUND_MIN, MODEL_SPEC, CaseError, LoadedCase, SliceSet, case_slices,
                           check_held_out, real_cases, site_cases, with_real_air)
from training.labels import NUM_CLASSES
from training.losses import MarginalDiceCELoss
from training.network import DEFAULT_CHANNELS, build_network, network_def
from training.transforms import AUGMENTATIONS, GEOMETRIES, seed_transforms, train_transforms

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in the checkpoint and the bundle metadata)."""

    out: str
    cases: list[str]
    holdout: list[str]
    synthetic: int = 0
    real_fraction: float = 0.5
    data_dir: str | None = None
    iterations: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    dice: str = "batch"
    side_agnostic: float = 0.0
    augmentation: str = "contrast"
    geometry: str = "basic"
    label_synthesis: float = 0.0
    dixon_contrasts: float = 0.0
    fov_crop: float = 0.0  # probability of a clinical field-of-view crop (RandFieldOfViewd)
    background_noise: float = 0.0  # % of the median: Rayleigh noise in a masked (exactly-0) background; 0: off
    air_margin: float = 0.0  # probability of framing a slice with air (RandAirMargind); 0: off
    gamma: list[float] | None = None  # log-uniform gamma range of the contrast augmentation; None: 0.6-1.6 uniform
    channels: list[int] = field(default_factory=lambda: list(DEFAULT_CHANNELS))
    head: bool = False
    context_slices: int = 0  # 2.5D: neighbour slices on each side as extra input channels
    seed: int = 0
    checkpoint_every: int = 100
    threads: int = 1
    init_checkpoint: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (checkpoints, log)")
    p.add_argument("--cases", nargs="*", default=["musclemap_sub0001"],
                   help="real training cases by id (see training.data.real_cases)")
    p.add_argument("--holdout", nargs="*", default=["myosegmentum_tum01"],
                   help="cases kept out of training (checked, recorded in the metadata)")
    p.add_argument("--synthetic", type=int, default=0, help="number of synthetic phantom volumes to add")
    p.add_argument("--real-fraction", type=float, default=0.5,
                   help="share of training samples drawn from real (non-synthetic) slices when both exist")
    p.add_argument("--data-dir", default=None,
                   help="site data: <case>_image.nii.gz + <case>_label.nii.gz pairs (optional dataset.json)")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine")
    p.add_argument("--dice", choices=("batch", "sample"), default="batch",
                   help="Dice over the batch per class (default) or per sample (MONAI DiceCELoss default)")
    p.add_argument("--side-agnostic", type=float, default=0.5,
                   help="weight of the extra Dice+CE on muscle types, right+left merged (training.losses)")
    p.add_argument("--augmentation", choices=AUGMENTATIONS, default="contrast")
    p.add_argument("--geometry", choices=GEOMETRIES, default="basic",
                   help="geometric augmentation: basic (0.2.0) or strong (wider affine, shear, elastic)")
    p.add_argument("--label-synthesis", type=float, default=0.0,
                   help="probability of re-drawing a slice from its tissue map (SynthSeg-style)")
    p.add_argument("--dixon-contrasts", type=float, default=0.0,
                   help="probability of re-mixing a Dixon case's water and fat into another contrast")
    p.add_argument("--fov-crop", type=float, default=0.0,
                   help="probability of cropping a slice to a clinical 140-260 mm field of view around the spine")
    p.add_argument("--background-noise", type=float, default=0.0, metavar="PERCENT",
                   help="fill the masked (exactly-0) background of a real case (more than "
                        f"{MASKED_BACKGROUND_MIN * 100:.0f} %% of its voxels at 0, e.g. MyoSegmenTUM) with Rayleigh noise of this "
                        "percent of its median intensity, as a real scan's air; 0: off")
    p.add_argument("--air-margin", type=float, default=0.0, metavar="P",
                   help="probability of framing a slice with 0-120 mm of air, half the time inside an elliptical "
                        "body outline (a wider field of view than the case shows); 0: off")
    p.add_argument("--gamma", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="draw the contrast augmentation's gamma log-uniformly from LOW-HIGH (0.4 2.5 spans both real "
                        "subjects' muscle-to-fat contrast, and made fold A worse: 0.6.0 card, 'Contrast'); "
                        "default: 0.6-1.6 uniform")
    p.add_argument("--channels", type=int, nargs="+", default=list(DEFAULT_CHANNELS))
    p.add_argument("--head", action="store_true",
                   help="1x1-conv classification head on channels[0] UNet features (see training.network)")
    p.add_argument("--context-slices", type=int, default=0,
                   help="2.5D input: this many neighbour slices on each side as extra channels (0: 2D)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="iterations per epoch/checkpoint")
    # One thread by default: on the shared 2-core machine a 2-thread OpenMP team stalls at
    # every barrier whenever another process holds a core (measured: ~5 s/it vs ~1.2 s/it).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--init", dest="init_checkpoint", default=None,
                   help="start from these weights (a checkpoint.pt or a bundle folder) to fine-tune")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop at the first checkpoint at or after this iteration (resume later with --resume); "
                        "the schedule still follows --iterations")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop at the first checkpoint after this much training time (shared machines)")
    p.add_argument("--export", default=None, help="export the final model as a bundle into this folder")
    p.add_argument("--version", default="0.1.0", help="bundle version when exporting")
    args = p.parse_args(argv)
    config = TrainConfig(
        out=args.out, cases=list(args.cases), holdout=list(args.holdout), synthetic=args.synthetic,
        real_fraction=args.real_fraction, data_dir=args.data_dir, iterations=args.iterations,
        batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, dice=args.dice,
        side_agnostic=args.side_agnostic, augmentation=args.augmentation,
        geometry=args.geometry, label_synthesis=args.label_synthesis, dixon_contrasts=args.dixon_contrasts,
        fov_crop=args.fov_crop, background_noise=args.background_noise, air_margin=args.air_margin,
        gamma=list(args.gamma) if args.gamma else None,
        channels=list(args.channels), head=args.head, context_slices=args.context_slices, seed=args.seed, checkpoint_every=args.checkpoint_every,
        threads=args.threads, init_checkpoint=args.init_checkpoint,
    )
    return config, args


def collect_slices(config: TrainConfig) -> list[SliceSet]:
    """Training slices of every requested source; held-out cases are refused."""
    registry: dict[str, Any] = dict(real_cases())
    if config.data_dir:
        site = site_cases(Path(config.data_dir))
        registry.update(site)
        # Site cases held out (the gate's evaluation cases) stay out of training.
        config.cases = sorted(set(config.cases) | (set(site) - set(config.holdout)))
    unknown = [c for c in config.cases if c not in registry]
    if unknown:
        raise CaseError(f"unknown case(s) {unknown}; known: {sorted(registry)}")
    check_held_out(config.cases, config.holdout)
    spec = replace(MODEL_SPEC, context_slices=config.context_slices)
    sets = [case_slices(_with_real_air(registry[c].load(), config), spec) for c in config.cases]
    if config.synthetic > 0:
        from training.synthetic import synthetic_cases  # needs paraspinal.phantom

        sets += [case_slices(case, spec) for case in synthetic_cases(config.synthetic, seed=config.seed)]
    if not any(s.items for s in sets):
        raise CaseError("no training slices")
    return sets


def _with_real_air(case: LoadedCase, config: TrainConfig) -> LoadedCase:
    """``case`` with noise in a masked background when ``config.background_noise`` asks for it
    (:func:`training.data.with_real_air`); cases without one train exactly as before."""
    return with_real_air(case, config.background_noise, seed=config.seed) if config.background_noise > 0 else case


def machine_description(threads: int) -> str:
    return (f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), torch {threads} threads, "
            f"{platform.system()} {platform.release()}, python {platform.python_version()}")


def load_initial_weights(network: torch.nn.Module, source: str) -> None:
    """Fine-tuning start point: a training checkpoint or an exported bundle (TorchScript)."""
    path = Path(source)
    if path.is_dir():
        state = torch.jit.load(str(path / "models" / "model.ts"), map_location="cpu").state_dict()
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=False)["model"]
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise CaseError(f"--init {source}: its network differs from this run's (--channels, --head, "
                        f"--context-slices must match): {str(exc).splitlines()[0]}") from exc


def init_provenance(source: str) -> dict[str, Any]:
    """Where a run's start weights come from, for the model card.

    A training checkpoint (a warm restart, or a fine-tune of a run): that run's length, seed,
    learning rate, schedule, training-loop time and data, and its own start, recursively; a bundle
    folder: the bundle's name and version.
    """
    path = Path(source)
    if path.is_dir():
        meta = read_metadata(path) if (path / METADATA_RELPATH).is_file() else {}
        return {"bundle": meta.get("name", path.name), "version": meta.get("version")}
    state = torch.load(str(path), map_location="cpu", weights_only=False)
    config = state.get("config", {})
    return {
        "iterations": int(state.get("iteration", 0)), "seed": config.get("seed"), "lr": config.get("lr"),
        "lr_schedule": config.get("lr_schedule"), "train_loop_s": round(float(state.get("elapsed_s", 0.0)), 1),
        "data": list(state.get("data", [])), "init": state.get("init_provenance"),
    }


def sampling_weights(items: list[dict[str, Any]], real_fraction: float) -> torch.Tensor:
    """Per-slice sampling weights so that real slices make up ``real_fraction`` of the draws.

    Synthetic phantoms are cheap and plentiful; without re-weighting a dozen of them would
    drown the one or two real volumes that carry the real-image appearance.
    """
    synthetic = torch.tensor([str(item["case"]).startswith("synthetic_") for item in items])
    n_syn, n_real = int(synthetic.sum()), int((~synthetic).sum())
    if n_syn == 0 or n_real == 0:
        return torch.ones(len(items), dtype=torch.double)
    if not 0.0 < real_fraction < 1.0:
        raise ValueError(f"--real-fraction must be within (0, 1), got {real_fraction}")
    return torch.where(synthetic, (1.0 - real_fraction) / n_syn, real_fraction / n_real).double()


def hard_overlap(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """(3, C) arg-max intersection, predicted and reference voxel counts per class over a batch,
    counting a class only in samples that label it (a training-progress signal: a class whose
    Dice stays at 0 has not been learned)."""
    pred = logits.argmax(1)
    ref = target.round().long()[:, 0]
    out = torch.zeros(3, logits.shape[1], dtype=torch.float64)
    for c in range(logits.shape[1]):
        keep = labelled[:, c].bool()
        if not keep.any():
            continue
        p, r = pred[keep] == c, ref[keep] == c
        out[0, c] += float((p & r).sum())
        out[1, c] += float(p.sum())
        out[2, c] += float(r.sum())
    return out


def lr_at(config: TrainConfig, iteration: int) -> float:
    """Learning rate at ``iteration``: constant, or cosine from lr to lr/100."""
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, iteration / max(1, config.iterations))
    return config.lr * (0.01 + 0.99 * 0.5 * (1.0 + np.cos(np.pi * progress)))


def train(config: TrainConfig, resume: bool = False, progress: bool = True, stop_at: int | None = None,
          max_minutes: float | None = None) -> Path:
    """Run (or resume) training; returns the path of the last checkpoint.

    ``stop_at`` / ``max_minutes`` end the run early at a checkpoint, as an interruption
    would; ``--resume`` then continues it exactly.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, config.threads))
    set_determinism(seed=config.seed)

    checkpoint_path = out / CHECKPOINT_NAME
    state: dict[str, Any] | None = None
    if resume and checkpoint_path.is_file():
        state = torch.load(str(checkpoint_path), map_location="cpu", weights_only=False)
        saved = TrainConfig(**state["config"])
        # Only the length of the run may change on resume; anything else would be another run.
        for key in ("cases", "holdout", "synthetic", "real_fraction", "batch_size", "lr", "dice", "side_agnostic", "augmentation",
                    "geometry", "label_synthesis", "dixon_contrasts", "fov_crop", "background_noise", "air_margin", "gamma", "channels", "head", "context_slices",
                    "seed"):
            if getattr(saved, key) != getattr(config, key):
                raise SystemExit(f"--resume: {key} differs from the checkpoint ({getattr(saved, key)!r})")
    sets = collect_slices(config)
    items = [item for s in sets for item in s.items]
    weights = sampling_weights(items, config.real_fraction)
    transforms = train_transforms(MODEL_SPEC.roi_size, config.augmentation, config.geometry,
                                  config.label_synthesis, config.dixon_contrasts, config.fov_crop, config.air_margin,
                                  tuple(config.gamma) if config.gamma else None)
    dataset = CacheDataset(items, transform=transforms, cache_rate=1.0, num_workers=0, progress=False)

    definition = network_def(tuple(config.channels), head=config.head, in_channels=1 + 2 * config.context_slices)
    network = build_network(definition)
    provenance: dict[str, Any] | None = None
    if config.init_checkpoint and state is None:
        load_initial_weights(network, config.init_checkpoint)
        provenance = init_provenance(config.init_checkpoint)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = MarginalDiceCELoss(batch=config.dice == "batch", lambda_side_agnostic=config.side_agnostic)
    iteration, elapsed, history = 0, 0.0, []
    class_dice: list[list[float | None]] = []  # hard training Dice per class, one row per epoch
    if state is not None:
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        iteration, elapsed, history = state["iteration"], state["elapsed_s"], state["history"]
        class_dice = state.get("class_dice", [])
        provenance = state.get("init_provenance")

    def save(path: Path) -> None:
        torch.save({
            "config": asdict(config), "model": network.state_dict(), "optimizer": optimizer.state_dict(),
            "iteration": iteration, "elapsed_s": elapsed, "history": history, "class_dice": class_dice,
            "network_def": definition, "data": [s.summary for s in sets], "num_slices": len(items),
            "init_provenance": provenance,
            "machine": machine_description(config.threads),
            "versions": {"monai": monai.__version__, "torch": torch.__version__},
        }, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)  # never leave a half-written checkpoint

    bar = tqdm(total=config.iterations, initial=iteration, desc="train", unit="it",
               disable=not progress, dynamic_ncols=True)
    network.train()
    session_s = 0.0
    while iteration < config.iterations:
        epoch = iteration // config.checkpoint_every
        steps = min(config.checkpoint_every, config.iterations - iteration)
        # Per-epoch seeds: the same (seed, epoch) always draws the same samples and augmentations.
        epoch_seed = config.seed * 1_000_003 + epoch
        set_determinism(seed=epoch_seed)  # global RNGs too, for anything not seeded explicitly
        seed_transforms(transforms, epoch_seed)
        generator = torch.Generator().manual_seed(epoch_seed)
        sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=steps * config.batch_size,
                                                         replacement=True, generator=generator)
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=0)
        started = time.monotonic()
        overlap = torch.zeros(3, NUM_CLASSES, dtype=torch.float64)  # intersection, |pred|, |ref| per class
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, iteration)
            optimizer.zero_grad(set_to_none=True)
            logits = network(batch["image"].float())
            loss = loss_fn(logits, batch["label"].round().long(), batch["labelled"])
            loss.backward()
            optimizer.step()
            overlap += hard_overlap(logits.detach(), batch["label"], batch["labelled"])
            iteration += 1
            history.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(history[-50:]):.3f}", lr=f"{lr_at(config, iteration):.1e}")
        elapsed += time.monotonic() - started
        class_dice.append([None if overlap[1, c] + overlap[2, c] == 0 else
                           round(float(2 * overlap[0, c] / (overlap[1, c] + overlap[2, c])), 4)
                           for c in range(NUM_CLASSES)])
        save(checkpoint_path)
        session_s += time.monotonic() - started
        if iteration < config.iterations and (
                (stop_at is not None and iteration >= stop_at)
                or (max_minutes is not None and session_s >= 60.0 * max_minutes)):
            bar.close()
            print(f"stopped at iteration {iteration} of {config.iterations}; continue with --resume", file=sys.stderr)
            return checkpoint_path
    bar.close()
    (out / "train_log.json").write_text(json.dumps({
        "config": asdict(config), "iterations": iteration, "elapsed_s": round(elapsed, 1),
        "loss_per_100": [round(float(np.mean(history[i:i + 100])), 4) for i in range(0, len(history), 100)],
        "data": [s.summary for s in sets],
        "train_dice_per_epoch": class_dice,
    }, indent=2))
    return checkpoint_path


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    try:
        checkpoint = train(config, resume=args.resume, stop_at=args.stop_at, max_minutes=args.max_minutes)
    except CaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {checkpoint}")
    finished = torch.load(str(checkpoint), map_location="cpu", weights_only=False)["iteration"] >= config.iterations
    if args.export and not finished:
        print("not exporting: the run has not reached --iterations yet", file=sys.stderr)
    elif args.export:
        from training.export import export_bundle, weights_limit_for

        bundle = export_bundle(checkpoint, Path(args.export), version=args.version,
                               max_weights_mb=weights_limit_for(Path(args.export)))
        print(f"bundle: {bundle}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
