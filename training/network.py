"""The network: MONAI 2D UNet as in Wesselink et al. (residual units, strided-conv down,
transposed-conv up, instance norm, LeakyReLU), described by a JSON-able ``network_def``
that goes into the bundle metadata so the architecture can be rebuilt from it.
"""

from __future__ import annotations

from typing import Any

from monai.networks.nets import UNet
from torch import nn

from training.labels import NUM_CLASSES

DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)


def network_def(channels: tuple[int, ...] = DEFAULT_CHANNELS, out_channels: int = NUM_CLASSES,
                head: bool = False, in_channels: int = 1) -> dict[str, Any]:
    """MONAI ``UNet`` arguments. MONAI's UNet downsamples with strided convolutions and
    upsamples with transposed convolutions (its defaults); two 3x3 convs per residual unit.

    ``head``: the UNet outputs ``channels[0]`` feature maps and a 1x1 convolution maps them to
    the class logits. In MONAI's UNet the last (full-resolution) layer is a transposed conv with
    instance norm + activation followed by one 3x3 conv, so without a head the class logits
    themselves are instance-normalised and rectified per channel, and the only full-resolution
    features are the C class channels.
    """
    if head:
        definition = network_def(channels, out_channels=channels[0], in_channels=in_channels)
        definition["head"] = {"_target_": "torch.nn.Conv2d", "in_channels": int(channels[0]),
                              "out_channels": int(out_channels), "kernel_size": 1}
        return definition
    return {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 2,
        "in_channels": int(in_channels),  # 1, or 1 + 2 x context slices (2.5D)
        "out_channels": int(out_channels),
        "channels": [int(c) for c in channels],
        "strides": [2] * (len(channels) - 1),
        "kernel_size": 3,
        "up_kernel_size": 3,
        "num_res_units": 2,
        "act": "LEAKYRELU",
        "norm": "INSTANCE",
        "dropout": 0.0,
    }


def build_network(definition: dict[str, Any]) -> nn.Module:
    """Instantiate the UNet described by ``definition`` (see :func:`network_def`)."""
    kwargs = {k: v for k, v in definition.items() if not k.startswith("_") and k != "head"}
    if definition.get("_target_", "monai.networks.nets.UNet") != "monai.networks.nets.UNet":
        raise ValueError(f"unsupported network {definition.get('_target_')!r}")
    kwargs["channels"] = tuple(kwargs["channels"])
    kwargs["strides"] = tuple(kwargs["strides"])
    unet = UNet(**kwargs)
    head = definition.get("head")
    if not head:
        return unet
    if head.get("_target_") != "torch.nn.Conv2d" or head.get("kernel_size") != 1:
        raise ValueError(f"unsupported head {head!r}")
    return nn.Sequential(unet, nn.Conv2d(int(head["in_channels"]), int(head["out_channels"]), kernel_size=1))


def context_slices_of(definition: dict[str, Any]) -> int:
    """Neighbour slices on each side a network built from ``definition`` expects (0: 2D input)."""
    return (int(definition.get("in_channels", 1)) - 1) // 2
