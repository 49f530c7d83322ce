"""Export a training checkpoint as the bundle the application loads.

Writes, under the bundle folder::

    configs/metadata.json   name, version, network and data format, preprocessing,
                            post-processing, label table (from training/labels.json),
                            training provenance, evaluation (filled by training.evaluate)
    models/model.ts         TorchScript, (B, 1, H, W) float32 z-scored -> (B, 9, H, W) logits
    docs/README.md          model card rendered from the metadata

Usage::

    python -m training.export output/train/fold_a/checkpoint.pt --out models/paraspinal_t2ax
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import monai
import torch

from paraspinal.model_bundle import METADATA_RELPATH, TORCHSCRIPT_RELPATH
from training.data import MODEL_SPEC, PROJECT_ROOT
from training.labels import NUM_CLASSES, label_name, label_table
from training.model_card import default_limits, render_model_card
from training.network import build_network, context_slices_of

BUNDLE_NAME = "paraspinal_t2ax"
MAX_WEIGHTS_MB = 20.0
COMMITTED_MODELS_DIR = PROJECT_ROOT / "models"


def weights_limit_for(out_dir: Path) -> float | None:
    """The size limit (MB) for weights exported to ``out_dir``: ``MAX_WEIGHTS_MB`` inside the repository's
    ``models/`` (they are committed), none elsewhere (experiment bundles in ``output/`` are git-ignored)."""
    return MAX_WEIGHTS_MB if Path(out_dir).resolve().is_relative_to(COMMITTED_MODELS_DIR.resolve()) else None
README_RELPATH = Path("docs") / "README.md"


def script_network(network: torch.nn.Module, roi: tuple[int, int], in_channels: int = 1) -> torch.jit.ScriptModule:
    """TorchScript of ``network`` checked against eager output on a random window."""
    network = network.eval()
    scripted = torch.jit.script(network)
    with torch.no_grad():
        x = torch.randn(2, in_channels, *roi, generator=torch.Generator().manual_seed(0))
        expected, got = network(x), scripted(x)
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError("TorchScript output differs from the eager network")
    return scripted


def data_format(context_slices: int = 0) -> dict[str, Any]:
    """``network_data_format`` of the MONAI bundle spec (inputs.image, outputs.pred)."""
    slice_text = "axial T2-weighted slice, RAS, 1x1 mm, z-scored over non-zero voxels"
    channel_def = {str(c + context_slices): (slice_text if c == 0 else f"slice k{c:+d} (voxel axis 2), as channel "
                                             f"{context_slices}; the edge slice repeated past the ends")
                   for c in range(-context_slices, context_slices + 1)}
    return {
        "inputs": {
            "image": {
                "type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1 + 2 * context_slices,
                "spatial_shape": [MODEL_SPEC.roi_size[0], MODEL_SPEC.roi_size[1]], "dtype": "float32",
                "value_range": [], "is_patch_data": True,
                "channel_def": channel_def,
            }
        },
        "outputs": {
            "pred": {
                "type": "image", "format": "segmentation", "num_channels": NUM_CLASSES,
                "spatial_shape": [MODEL_SPEC.roi_size[0], MODEL_SPEC.roi_size[1]], "dtype": "float32",
                "value_range": [], "is_patch_data": True,
                "channel_def": {str(v): label_name(v) for v in range(NUM_CLASSES)},
            }
        },
    }


def preprocessing_entry(context_slices: int = 0) -> dict[str, Any]:
    return {
        "context_slices": int(context_slices),
        "orientation": MODEL_SPEC.orientation,
        "pixdim_mm": list(MODEL_SPEC.pixdim_mm),
        "intensity": MODEL_SPEC.intensity,
        "roi_size": list(MODEL_SPEC.roi_size),
        "overlap": MODEL_SPEC.overlap,
        "blend_mode": MODEL_SPEC.blend_mode,
        "sw_batch_size": MODEL_SPEC.sw_batch_size,
        "padding": MODEL_SPEC.padding,
        "slice_axis": 2,
    }


GEOMETRY_TEXT = {
    "basic": "pad to 256, pos/neg crop 2:1, mirror with R/L label swap p=0.5, rotation +-0.2 rad and scale "
             "+-15 % p=0.5",
    "strong": "pad to 256, pos/neg crop 2:1, mirror with R/L label swap p=0.5, rotation +-0.3 rad, anisotropic "
              "scale +-25 %, shear +-0.1 p=0.7, elastic (32 px control grid, 1-4 px) p=0.25",
}


def training_entry(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Provenance of the weights, from the checkpoint the training run wrote."""
    config = checkpoint["config"]
    elapsed = float(checkpoint["elapsed_s"])
    history = checkpoint.get("history", [])
    return {
        "data": checkpoint["data"],
        "cases": list(config["cases"]),
        "synthetic_volumes": int(config.get("synthetic", 0)),
        "held_out": config["holdout"],
        "num_slices": checkpoint["num_slices"],
        "recipe": {
            "loss": f"Dice ({config.get('dice', 'sample')}-wise) + cross-entropy, marginal over classes a case "
                    "does not label (Shi et al. 2021)"
                    + (f", plus {config['side_agnostic']} x the same on muscle types (right+left merged)"
                       if config.get("side_agnostic") else ""),
            "optimizer": "AdamW", "lr": config["lr"], "weight_decay": config["weight_decay"],
            "lr_schedule": config["lr_schedule"], "batch_size": config["batch_size"],
            "patch": list(MODEL_SPEC.roi_size),
            "context_slices": int(config.get("context_slices", 0)),
            "augmentation": {
                "geometric": GEOMETRY_TEXT[config.get("geometry", "basic")],
                "contrast": config["augmentation"],
                "label_synthesis_p": float(config.get("label_synthesis", 0.0)),
                "dixon_contrasts_p": float(config.get("dixon_contrasts", 0.0)),
                "fov_crop_p": float(config.get("fov_crop", 0.0)),
                "background_noise_pct": float(config.get("background_noise", 0.0)),
                "air_margin_p": float(config.get("air_margin", 0.0)),
                "gamma_range": list(config["gamma"]) if config.get("gamma") else None,
            },
            "init": config.get("init_checkpoint"),
            "init_run": checkpoint.get("init_provenance"),
            "selection": "last iterate (no validation data was used for model selection)",
        },
        "seed": config["seed"],
        "iterations": checkpoint["iteration"],
        "final_loss_mean_last_100": round(sum(history[-100:]) / max(1, len(history[-100:])), 4),
        "final_train_dice_per_class": (checkpoint.get("class_dice") or [None])[-1],
        "time": {"train_loop_s": round(elapsed, 1), "train_loop_min": round(elapsed / 60.0, 1)},
        "machine": checkpoint["machine"],
    }


def export_bundle(checkpoint_path: Path, out_dir: Path, version: str = "0.1.0", name: str = BUNDLE_NAME,
                  description: str | None = None, test_time_mirror: bool = True,
                  max_weights_mb: float | None = MAX_WEIGHTS_MB) -> Path:
    """Write a bundle from a training checkpoint; returns the bundle folder (``max_weights_mb``: as in
    ``write_bundle``)."""
    checkpoint = torch.load(str(checkpoint_path), map_location="cpu", weights_only=False)
    network = build_network(checkpoint["network_def"])
    network.load_state_dict(checkpoint["model"])
    return write_bundle(network, checkpoint["network_def"], Path(out_dir), training_entry(checkpoint),
                        name=name, version=version, description=description, test_time_mirror=test_time_mirror,
                        max_weights_mb=max_weights_mb)


def write_bundle(network: torch.nn.Module, definition: dict[str, Any], out_dir: Path, training: dict[str, Any],
                 name: str = BUNDLE_NAME, version: str = "0.1.0", description: str | None = None,
                 license_text: str | None = None, max_weights_mb: float | None = MAX_WEIGHTS_MB,
                 parameters: int | None = None, limits: Sequence[str] | None = None,
                 test_time_mirror: bool = False) -> Path:
    """Script ``network`` and write the bundle folder (weights, metadata, model card).

    Any earlier ``evaluation`` in the folder is dropped: it measured other weights.
    ``max_weights_mb`` guards the size of weights meant to be committed (None: no limit).
    """
    # A 2.5D network (1 + 2n input channels) takes n neighbour slices on each side.
    in_channels = int(definition.get("in_channels", 1))
    if in_channels % 2 != 1:
        raise ValueError(f"network in_channels must be odd (1 + 2 x context slices), got {in_channels}")
    context_slices = context_slices_of(definition)
    scripted = script_network(network, MODEL_SPEC.roi_size, in_channels)
    (out_dir / TORCHSCRIPT_RELPATH).parent.mkdir(parents=True, exist_ok=True)
    (out_dir / METADATA_RELPATH).parent.mkdir(parents=True, exist_ok=True)
    (out_dir / README_RELPATH).parent.mkdir(parents=True, exist_ok=True)
    stale = out_dir / "docs" / "evaluation"
    if stale.is_dir():
        shutil.rmtree(stale)
    weights = out_dir / TORCHSCRIPT_RELPATH
    torch.jit.save(scripted, str(weights))
    size_mb = weights.stat().st_size / 1e6
    if max_weights_mb is not None and size_mb > max_weights_mb:
        weights.unlink()
        raise RuntimeError(f"{weights}: {size_mb:.1f} MB exceeds the {max_weights_mb} MB limit for committed weights")

    metadata: dict[str, Any] = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "name": name,
        "version": version,
        "description": description or (
            ("2D UNet" if context_slices == 0 else f"2.5D UNet (2D network, {in_channels} neighbouring slices in)")
            + " segmenting the lumbar paraspinal muscles (multifidus, erector spinae, psoas major, "
            "quadratus lumborum; right and left) on axial T2-weighted MRI, slice by slice. Research use only."),
        "authors": "Paraspinal Muscle Node project",
        "copyright": "Paraspinal Muscle Node project",
        "license": license_text or (
            "Research use only; not a medical device. Weights trained by the project on the data listed under "
            "'training' (MuscleMap sample: MIT; MyoSegmenTUM spine: public reference database, masks Apache-2.0; "
            "synthetic phantoms: project code)."),
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__,
        "task": "Lumbar paraspinal muscle segmentation (axial T2 MRI, 2D slices)",
        "data_type": "dicom/nifti",
        "image_classes": ("single-channel axial T2-weighted MR slice, z-scored" if context_slices == 0 else
                          f"axial T2-weighted MR slice with {context_slices} neighbour slice(s) on each side as "
                          f"channels (2.5D), z-scored"),
        "label_classes": "; ".join(f"{v}: {label_name(v)}" for v in range(NUM_CLASSES)),
        "network_data_format": data_format(context_slices),
        "network_def": definition,
        "preprocessing": preprocessing_entry(context_slices),
        "postprocessing": {"largest_component_3d": True, "fill_holes": True},
        # Test-time mirroring: the application averages the softmax of each slice with that of the
        # slice mirrored left-right (labels swapped back); it also yields the QC disagreement score.
        "inference": {"test_time_mirror": bool(test_time_mirror)},
        **label_table(),
        "limits": list(limits if limits is not None else default_limits(context_slices)),
        "training": training,
        "evaluation": {"measured": False,
                       "how": f"python -m training.evaluate --bundle {out_dir} --case <held-out case> --update-bundle"},
        "weights": {"file": str(TORCHSCRIPT_RELPATH), "size_mb": round(size_mb, 2),
                    "parameters": int(parameters if parameters is not None
                                      else sum(p.numel() for p in network.parameters()))},
    }
    write_metadata(out_dir, metadata)
    return out_dir


def write_metadata(bundle_dir: Path, metadata: dict[str, Any]) -> None:
    """Write metadata.json and re-render the model card from it (they never disagree)."""
    (bundle_dir / METADATA_RELPATH).write_text(json.dumps(metadata, indent=2) + "\n")
    (bundle_dir / README_RELPATH).write_text(render_model_card(metadata))


def add_recipe_check(metadata: dict[str, Any], title: str, text: str, rows: list[dict[str, Any]] | None = None
                     ) -> dict[str, Any]:
    """Put a titled section (an ablation, a fold table, a timing) into ``metadata``'s evaluation,
    replacing one of the same title; the model card renders it. Returns the evaluation entry."""
    evaluation = metadata.setdefault("evaluation", {"measured": False})
    checks = [c for c in evaluation.get("recipe_checks", []) if c.get("title") != title]
    checks.append({"title": title, "text": text, **({"rows": rows} if rows is not None else {})})
    evaluation["recipe_checks"] = checks
    return evaluation


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=Path("models") / BUNDLE_NAME)
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--name", default=BUNDLE_NAME)
    p.add_argument("--no-test-time-mirror", action="store_true",
                   help="the application infers each slice once (no mirrored second pass, no disagreement score)")
    p.add_argument("--max-weights-mb", type=float, default=None,
                   help=f"refuse larger weights; default {MAX_WEIGHTS_MB} MB (the limit for weights committed to the "
                        "repository) when --out is inside models/, no limit elsewhere; 0: no limit")
    args = p.parse_args(argv)
    limit = weights_limit_for(args.out) if args.max_weights_mb is None else (args.max_weights_mb or None)
    print(export_bundle(args.checkpoint, args.out, version=args.version, name=args.name,
                        test_time_mirror=not args.no_test_time_mirror, max_weights_mb=limit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
