"""A U-Net whose encoder is a torchvision ResNet: the COCO colorization tutorial's final generator.

The tutorial (M. Shariatnia, 2020) builds fastai's `DynamicUnet` on `create_body(resnet18,
pretrained=True, n_in=1, cut=-2)`. We take the encoder from torchvision (already a dependency;
its ImageNet weights come through torch hub's usual cache) and add a small U-Net decoder in the
style of segmentation-models-pytorch's `Unet`; why not fastai or smp itself, and how this decoder
differs from DynamicUnet: docs/design.md, "The ResNet-encoder generator".

Shapes: 1 input channel (L), 2 outputs (ab) through tanh, like the pix2pix U-Net; the encoder
halves the size 5 times, so inputs must be multiples of 32.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError
from .imageio import first_line
from .ranks import agree

ENCODERS = {"resnet18-unet": "resnet18", "resnet34-unet": "resnet34"}
"""model.generator values with a ResNet encoder -> the torchvision model of that encoder."""
DECODER_CHANNELS = (256, 128, 64, 32, 16)
"""Output channels of the decoder's five stages, strides 16, 8, 4, 2, 1 (smp's default)."""
DOWNLOAD_TIMEOUT_S = 60
"""A download that gets no bytes for this long fails instead of hanging the run."""


class EncoderWeightsError(UserError):
    """Encoder weights that cannot be had or used (no file, wrong file, offline); one line."""


class _DecoderStage(nn.Module):
    """Upsample x2 (nearest), concatenate the encoder's skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in in (in_channels + skip_channels, out_channels):
            layers += [nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.block(x if skip is None else torch.cat([x, skip], dim=1))


class ResNetUNet(nn.Module):
    """ResNet-18/34 encoder (1 input channel) + U-Net decoder + 3x3 conv to 2 channels + tanh."""

    num_downs = 5
    """Stride-2 steps of the encoder: inputs must be multiples of 2**num_downs (as UNetGenerator)."""

    def __init__(self, generator: str = "resnet18-unet", in_channels: int = 1,
                 out_channels: int = 2) -> None:
        super().__init__()
        if generator not in ENCODERS:
            raise ValueError(f"unknown ResNet generator {generator!r}; one of {sorted(ENCODERS)}")
        self.generator = generator
        # Imported here, not with this module: torchvision imports torch._dynamo (~180 MB), which
        # colorize with a plain U-Net never needs (docs/design.md, "Colorize memory").
        import torchvision

        self.encoder = getattr(torchvision.models, ENCODERS[generator])(weights=None)
        del self.encoder.fc, self.encoder.avgpool  # fastai's cut=-2: the classifier goes
        self.encoder.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(self.encoder.conv1.weight, mode="fan_out", nonlinearity="relu")
        skips = (256, 128, 64, 64, 0)  # layer3, layer2, layer1, the stem; none at full size
        ins = (512, *DECODER_CHANNELS[:-1])
        self.decoder = nn.ModuleList(_DecoderStage(i, s, o)
                                     for i, s, o in zip(ins, skips, DECODER_CHANNELS))
        self.head = nn.Conv2d(DECODER_CHANNELS[-1], out_channels, 3, padding=1)
        # smp's initialisation of its decoder and head (the encoder keeps torchvision's, or
        # pretrained weights); a ReLU-scaled head would start with tanh saturated.
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        e = self.encoder
        stem = e.relu(e.bn1(e.conv1(x)))          # stride 2, 64 channels
        f1 = e.layer1(e.maxpool(stem))            # stride 4
        f2 = e.layer2(f1)                         # stride 8
        f3 = e.layer3(f2)                         # stride 16
        y = e.layer4(f3)                          # stride 32
        for stage, skip in zip(self.decoder, (f3, f2, f1, stem, None)):
            y = stage(y, skip)
        return torch.tanh(self.head(y))

    def load_encoder(self, state: dict[str, Tensor], source: str) -> None:
        """Set the encoder's weights and BatchNorm statistics to `state` (a torchvision ResNet
        state_dict; its classifier is ignored). A 3-channel first convolution is summed over its
        input channels (fastai's n_in=1 and smp do the same): the 1-channel network then computes
        on L exactly what the 3-channel one computes on the gray image (L, L, L)."""
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        conv1 = state.get("conv1.weight")
        if isinstance(conv1, Tensor) and conv1.dim() == 4 and conv1.shape[1] == 3:
            state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
        expected = self.encoder.state_dict()
        missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or extra:
            raise EncoderWeightsError(
                f"{source} is not a {ENCODERS[self.generator]} state_dict (missing "
                f"{missing[:3]}, unexpected {extra[:3]})")
        for name, value in state.items():
            if not isinstance(value, Tensor) or value.shape != expected[name].shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise EncoderWeightsError(
                    f"{source}: {name} is {shape}, a {ENCODERS[self.generator]} with "
                    f"1 input channel needs {tuple(expected[name].shape)}")
        self.encoder.load_state_dict(state)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)  # torch.hub's urlopen has no timeout of its own
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_state(generator: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights of the encoder, from torch hub's cache, downloaded into it
    when missing; offline, EncoderWeightsError naming the file and where it must go."""
    import torchvision

    weights = torchvision.models.get_model_weights(ENCODERS[generator]).IMAGENET1K_V1
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    cached = file.is_file()
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError (offline), a hash mismatch, an unreadable cached file
        reason = (str(getattr(exc, "reason", exc)).strip().splitlines() or [type(exc).__name__])[0]
        if cached:
            raise EncoderWeightsError(
                f"model.encoder_weights=imagenet: cannot read the cached {file} ({reason}); "
                f"delete it to download it again, or replace it with {weights.url}") from None
        raise EncoderWeightsError(
            f"model.encoder_weights=imagenet: cannot download {weights.url} ({reason}); "
            f"offline, copy {file.name} to {file} (torch hub's cache: $TORCH_HOME/hub/checkpoints), "
            f"or set model.encoder_weights to a local file or none") from None


def file_state(path: str) -> dict[str, Tensor]:
    """A state_dict saved with torch.save (loaded with weights_only=True)."""
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for files that are not checkpoints
        raise EncoderWeightsError(f"model.encoder_weights={path}: cannot load it ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise EncoderWeightsError(f"model.encoder_weights={path} holds a {type(state).__name__}, "
                                  f"not a state_dict")
    return state


def load_encoder_weights(generator: nn.Module, weights: str, accelerator) -> None:
    """Collective (every rank calls it): give a new ResNetUNet its encoder weights, `imagenet`,
    a local file or `none`; a pix2pix U-Net is left alone. Rank 0 goes first, so that only it
    downloads into the shared cache; an error on any rank is raised on all of them."""
    if not isinstance(generator, ResNetUNet) or weights == "none":
        return
    error = None
    with accelerator.main_process_first():
        try:
            state = imagenet_state(generator.generator) if weights == "imagenet" else file_state(weights)
            generator.load_encoder(state, "imagenet weights" if weights == "imagenet" else weights)
        except EncoderWeightsError as exc:
            error = str(exc)
    agree(error, EncoderWeightsError)
