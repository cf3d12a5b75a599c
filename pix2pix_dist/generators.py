"""The generator a run uses, built from one description (its export metadata): the pix2pix U-Net
(models.py) or a ResNet-encoder U-Net (resnet_unet.py). Training, exports, inference copies and
the sample grids all build through `build_generator`, so each rebuilds the architecture a run
trained from its metadata alone, without any download (encoder weights are loaded only when a
run starts fresh: resnet_unet.load_encoder_weights)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from .models import UNetGenerator
from .resnet_unet import ENCODERS, ResNetUNet

if TYPE_CHECKING:
    from .config import ModelConfig

GENERATORS = ("unet", *ENCODERS)
"""model.generator's values."""


def generator_args(m: "ModelConfig") -> dict[str, Any]:
    """The generator's constructor description (kind and arguments), as exports record it."""
    if m.generator == "unet":
        return {"generator": "unet", "in_channels": 1, "out_channels": 2,
                "num_downs": m.num_downs, "ngf": m.ngf, "norm": m.norm, "dropout": m.dropout}
    return {"generator": m.generator, "in_channels": 1, "out_channels": 2}


def build_generator(args: dict[str, Any]) -> nn.Module:
    """The generator `args` (from generator_args or an export) describes, with fresh weights.
    Exports written before `generator` was recorded are pix2pix U-Nets."""
    kind, rest = args.get("generator", "unet"), {k: v for k, v in args.items() if k != "generator"}
    if kind == "unet":
        return UNetGenerator(**rest)
    return ResNetUNet(kind, **rest)
