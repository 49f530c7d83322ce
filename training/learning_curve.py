"""Learning curve of site corrections on the real data there is.

    nice -n 19 python -m training.learning_curve --start ../main/output/bundles/v3_foldA \\
        --out output/learning_curve --steps 4 8 20 --iterations 150

The start model never saw MyoSegmenTUM tum01 (fold A: MuscleMap sub-0001 + phantoms). The
labelled axial slices of tum01 are cut into contiguous blocks of three; every third block is
the evaluation set, never trained on. The other slices are the "corrections", fed in a fixed
shuffled order in cumulative batches (``--steps``: number of corrected slices): for each batch the start model is
fine-tuned (as ``training.finetune`` does: from the bundle's weights, marginal Dice+CE on the
labels tum01 has -- multifidus and erector spinae -- plus MuscleMap sub-0001, one CPU thread)
and Dice is measured on the evaluation slices (post-processed, per label, application
inference with the bundle's test-time mirroring). Step 0 is the start model unchanged; a
control fine-tunes with MuscleMap only for the same iterations, to separate the effect of the
corrections from that of fine-tuning itself.

Honest limits: one subject, so "corrected studies" are slices of the same subject, and
evaluation slices are neighbours of training slices (optimistic against a new patient).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch

from paraspinal.model_bundle import load_bundle, read_metadata
from training.data import LoadedCase, real_cases
from training.evaluate import predict_probabilities
from training.export import export_bundle
from training.postprocess import postprocess_labels
from training.network import context_slices_of
from training.train import TrainConfig, train

CASE = "myosegmentum_tum01"
LABELS = (1, 2, 3, 4)


def split_slices(label: np.ndarray, block: int = 3, order_seed: int = 0) -> tuple[list[int], list[int]]:
    """(correction slices, evaluation slices) of the labelled K indices: contiguous blocks of
    ``block`` slices, every third block for evaluation."""
    labelled = [k for k in range(label.shape[2]) if (label[:, :, k] > 0).any()]
    blocks = [labelled[i:i + block] for i in range(0, len(labelled), block)]
    evaluation = [k for i, b in enumerate(blocks) if i % 3 == 1 for k in b]
    corrections = [k for i, b in enumerate(blocks) if i % 3 != 1 for k in b]
    # Fed in a fixed shuffled order, so that a small batch spans the levels as corrected
    # studies would, rather than only the lowest slices.
    order = np.random.default_rng(order_seed).permutation(len(corrections))
    return [corrections[i] for i in order], evaluation


def dice_on(case: LoadedCase, bundle_path: Path, slices: Sequence[int]) -> dict[str, float]:
    """Post-processed Dice per label over the given K slices."""
    bundle = load_bundle(bundle_path, "cpu")
    probs, _ = predict_probabilities(case, bundle)
    pred = postprocess_labels(np.argmax(probs, axis=0).astype(np.uint8), case.spacing_mm)[:, :, list(slices)]
    ref = case.label[:, :, list(slices)]
    out = {}
    for label in LABELS:
        r, p = ref == label, pred == label
        out[str(label)] = round(2.0 * float((r & p).sum()) / max(1.0, float(r.sum() + p.sum())), 4)
    out["mean"] = round(float(np.mean([out[str(v)] for v in LABELS])), 4)
    return out


def write_correction_dir(case: LoadedCase, slices: Sequence[int], folder: Path) -> None:
    """The case with labels kept only on ``slices``, as a --data-dir NIfTI pair (site layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    label = np.zeros_like(case.label)
    label[:, :, list(slices)] = case.label[:, :, list(slices)]
    nib.save(nib.Nifti1Image(case.image.astype(np.float32), case.affine_ras), str(folder / "tum01c_image.nii.gz"))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), case.affine_ras), str(folder / "tum01c_label.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"labelled_classes": [0, *LABELS]}))


def run(start: Path, out: Path, steps: Sequence[int], iterations: int, batch_size: int, lr: float,
        control: bool, order_seed: int = 0) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    case = real_cases()[CASE].load()
    corrections, evaluation = split_slices(case.label, order_seed=order_seed)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    results_path = out / "learning_curve.json"
    plan = [("start", 0)] + ([("control", 0)] if control else []) + [("corrections", n) for n in steps if n > 0]
    for kind, n in plan:
        entry: dict[str, Any] = {"kind": kind, "corrected_slices": n, "eval_slices": evaluation}
        bundle_path = start
        if kind != "start":
            run_dir = out / f"{kind}_{n:02d}"
            data_dir = None
            if n:
                data_dir = run_dir / "data"
                write_correction_dir(case, corrections[:n], data_dir)
                entry["train_slices"] = corrections[:n]
            config = TrainConfig(out=str(run_dir / "train"), cases=["musclemap_sub0001"], holdout=[CASE],
                                 data_dir=str(data_dir) if data_dir else None, iterations=iterations,
                                 batch_size=batch_size, lr=lr, side_agnostic=0.5, checkpoint_every=iterations,
                                 threads=1, init_checkpoint=str(start),
                                 context_slices=context_slices_of(read_metadata(Path(start))["network_def"]))
            wall, cpu = time.monotonic(), time.process_time()
            checkpoint = train(config, progress=False)
            entry["finetune_wall_s"] = round(time.monotonic() - wall, 1)
            entry["finetune_cpu_s"] = round(time.process_time() - cpu, 1)
            bundle_path = export_bundle(checkpoint, run_dir / "bundle", version=f"lc-{kind}-{n}",
                                        test_time_mirror=bool(read_metadata(start).get("inference", {})
                                                              .get("test_time_mirror", False)))
        wall = time.monotonic()
        entry["dice"] = dice_on(case, bundle_path, evaluation)
        entry["eval_wall_s"] = round(time.monotonic() - wall, 1)
        results.append(entry)
        results_path.write_text(json.dumps({
            "start": str(start), "start_version": read_metadata(start).get("version"), "case": CASE,
            "correction_order": corrections, "eval_slices": evaluation, "iterations": iterations,
            "batch_size": batch_size, "lr": lr, "threads": 1, "order_seed": order_seed, "results": results},
            indent=2))
        print(json.dumps(entry), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.learning_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--start", type=Path, required=True, help="bundle that never saw tum01")
    p.add_argument("--out", type=Path, default=Path("output") / "learning_curve")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 20])
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--no-control", action="store_true")
    p.add_argument("--order-seed", type=int, default=0, help="seed of the order in which slices are fed")
    args = p.parse_args(argv)
    run(args.start, args.out, args.steps, args.iterations, args.batch_size, args.lr, not args.no_control,
        args.order_seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
