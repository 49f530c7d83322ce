"""Import a MuscleMap-format checkpoint as a bundle the application can load.

The MuscleMap lumbar model is a MONAI 2D UNet (channels 64/128/256/512/1024, strides 2,
2 residual units, instance norm, LeakyReLU) with 9 outputs in the same label numbering
as this project (0 background, 1/2 multifidus R/L, 3/4 erector spinae R/L, 5/6 psoas
major R/L, 7/8 quadratus lumborum R/L) and the same preprocessing (RAS, 1x1 mm in-plane,
z-score over non-zero voxels, sliding window with Gaussian blending). Its checkpoint is a
plain ``state_dict``; this tool rebuilds the network, loads the weights strictly (a
mismatch is reported key by key), optionally reorders output channels, and writes
TorchScript + metadata + model card.

Usage::

    python -m training.import_musclemap STATE_DICT.pth --out models/musclemap_import
        [--channel-order 0 1 2 3 4 5 6 7 8]   # source output channel of bundle label 0..8

The resulting weights are ~100 MB: above the 20 MB limit for committed weights, so the
import folder is for local use and is not meant to be committed.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from training.export import write_bundle
from training.labels import NUM_CLASSES
from training.network import build_network, network_def

MUSCLEMAP_CHANNELS = (64, 128, 256, 512, 1024)


class ChannelOrder(nn.Module):
    """Reorders the output channels of a network: output[:, c] = inner(x)[:, order[c]].

    Used when a checkpoint numbers its outputs differently from the bundle labels; the
    permutation lives in the TorchScript, so the application never sees the source order.
    """

    def __init__(self, inner: nn.Module, order: Sequence[int]):
        super().__init__()
        self.inner = inner
        self.register_buffer("order", torch.as_tensor(list(order), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.index_select(self.inner(x), 1, self.order)


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint: a plain state_dict, or one nested under a
    common key (``state_dict``, ``model``, ``network``), with a DataParallel ``module.``
    prefix removed."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "network", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint is not a state_dict (mapping of parameter names to tensors)")
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def build_imported_network(state_dict: dict[str, torch.Tensor], channel_order: Sequence[int] | None = None
                           ) -> tuple[nn.Module, dict[str, Any]]:
    """MONAI UNet with the MuscleMap architecture, loaded strictly from ``state_dict``."""
    definition = network_def(MUSCLEMAP_CHANNELS, out_channels=NUM_CLASSES)
    network = build_network(definition)
    result = network.load_state_dict(state_dict, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} key(s), e.g. {result.missing_keys[:3]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} key(s), e.g. {result.unexpected_keys[:3]}")
    if problems:
        raise ValueError("checkpoint does not match the MuscleMap UNet (channels 64..1024, 9 outputs): "
                         + "; ".join(problems))
    network.eval()
    if channel_order is not None:
        order = [int(c) for c in channel_order]
        if sorted(order) != list(range(NUM_CLASSES)):
            raise ValueError(f"--channel-order must be a permutation of 0..{NUM_CLASSES - 1}, got {order}")
        if order != list(range(NUM_CLASSES)):
            return ChannelOrder(network, order).eval(), definition
    return network, definition


def import_checkpoint(path: Path, out_dir: Path, channel_order: Sequence[int] | None = None,
                      version: str = "0.0.0-musclemap") -> Path:
    """Convert the checkpoint at ``path`` into a bundle at ``out_dir``."""
    raw = path.read_bytes()
    state = extract_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    network, definition = build_imported_network(state, channel_order)
    digest = hashlib.sha256(raw).hexdigest()
    training = {
        "data": [f"not trained here: imported MuscleMap-format checkpoint {path.name} (sha256 {digest[:16]}); "
                 "its training data and recipe are those documented by its provider"],
        "held_out": [],
        "num_slices": None,
        "recipe": {"loss": "as documented by the checkpoint provider", "optimizer": None, "lr": None,
                   "weight_decay": None, "lr_schedule": None, "batch_size": None, "patch": [256, 256],
                   "augmentation": {"geometric": "unknown", "contrast": "unknown"},
                   "init": str(path), "selection": "as provided",
                   "channel_order": list(channel_order) if channel_order is not None else list(range(NUM_CLASSES))},
        "seed": None,
        "iterations": None,
        "time": {"train_loop_s": None, "train_loop_min": None},
        "machine": "not trained here",
        "imported_from": {"file": path.name, "sha256": digest},
    }
    return write_bundle(
        network, definition, Path(out_dir), training, name="musclemap_import", version=version,
        description="MuscleMap 2D UNet (64-1024 channels) imported into the paraspinal bundle format. "
                    "Research use only; evaluate it with training.evaluate before use.",
        license_text="As licensed by the checkpoint's provider (MuscleMap project); research use only.",
        max_weights_mb=None,
        limits=[
            "Imported weights: neither trained nor validated by this project; its figures are only those "
            "measured with training.evaluate after import (none until then).",
            "The checkpoint's training data, label protocol and preprocessing are as documented by its provider; "
            "this import assumes the documented ones (RAS, 1x1 mm, z-score over non-zero voxels, 9 outputs).",
            "About 100 MB of weights: above the 20 MB limit for committed weights; keep the bundle local.",
            "2D slice-wise model: no through-plane context.",
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.import_musclemap", description=__doc__.split("\n\n")[0])
    p.add_argument("state_dict", type=Path, help="MuscleMap-format .pth (plain state_dict)")
    p.add_argument("--out", type=Path, default=Path("models") / "musclemap_import")
    p.add_argument("--channel-order", type=int, nargs=NUM_CLASSES, default=None,
                   help="for bundle label 0..8, the checkpoint's output channel (default: identity)")
    p.add_argument("--version", default="0.0.0-musclemap")
    args = p.parse_args(argv)
    bundle = import_checkpoint(args.state_dict, args.out, args.channel_order, args.version)
    size = (bundle / "models" / "model.ts").stat().st_size / 1e6
    print(f"bundle: {bundle} ({size:.0f} MB of weights; not for committing when above 20 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
