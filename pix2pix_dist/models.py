"""pix2pix networks: U-Net generator, PatchGAN discriminator, weight init. Architecture only.

The math follows the pix2pix reference (Isola et al. 2017, junyanz/pytorch-CycleGAN-and-pix2pix):
unet_256 with ngf=64 and BatchNorm has 54,409,858 parameters for 1 -> 2 channels, and the 70x70
PatchGAN on 3 channels has 2,765,633 and gives a 30x30 map at 256x256.
"""

from __future__ import annotations

import torch
from torch import nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm (affine, running stats) or InstanceNorm (no affine, no stats), as in pix2pix.

    `batch` and `batch_local` both build plain BatchNorm: they differ only with more than one
    process, where the training loop makes `batch` layers cross-process (global_batchnorm.py;
    that needs a process group, and inference copies run on one process)."""
    if kind in ("batch", "batch_local"):
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    raise ValueError(f"unknown norm {kind!r}")


class UNetBlock(nn.Module):
    """One U-Net level: downsample, the inner levels, upsample, and the skip concatenation.

    The reference applies its first LeakyReLU in place, so the skip connection carries the
    *activated* input. We keep that math with an out-of-place activation applied before both
    the skip and the down path (in-place ops on a tensor autograd needs are a trap)."""

    def __init__(self, outer: int, inner: int, *, in_channels: int | None = None,
                 inner_block: nn.Module | None = None, outermost: bool = False,
                 norm: str = "batch", dropout: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        in_channels = outer if in_channels is None else in_channels
        bias = norm == "instance"  # BatchNorm has its own shift, so convs before it have none
        innermost = inner_block is None
        down: list[nn.Module] = [nn.Conv2d(in_channels, inner, 4, 2, 1, bias=bias)]
        if not (outermost or innermost):
            down.append(norm_layer(norm, inner))
        up_in = inner if innermost else inner * 2
        up: list[nn.Module] = [nn.ReLU()]
        if outermost:
            up += [nn.ConvTranspose2d(up_in, outer, 4, 2, 1), nn.Tanh()]
        else:
            up += [nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=bias), norm_layer(norm, outer)]
            if dropout:
                up.append(nn.Dropout(0.5))
        self.down = nn.Sequential(*down)
        self.inner = inner_block if inner_block is not None else nn.Identity()
        self.up = nn.Sequential(*up)
        self.act = nn.Identity() if outermost else nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        y = self.up(self.inner(self.down(x)))
        return y if self.outermost else torch.cat([x, y], dim=1)


class UNetGenerator(nn.Module):
    """pix2pix U-Net: `num_downs` stride-2 levels (8 = unet_256, 7 = unet_128), skip i <-> n-i."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, *, num_downs: int = 8,
                 ngf: int = 64, norm: str = "batch", dropout: bool = True) -> None:
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5, got {num_downs}")
        self.num_downs = num_downs  # inputs must be multiples of 2**num_downs
        block = UNetBlock(ngf * 8, ngf * 8, norm=norm)  # innermost (1x1 at unet_256)
        for _ in range(num_downs - 5):  # the 512-channel middle levels, with dropout
            block = UNetBlock(ngf * 8, ngf * 8, inner_block=block, norm=norm, dropout=dropout)
        for mult in (4, 2, 1):  # the ngf*4, ngf*2, ngf levels, without dropout
            block = UNetBlock(ngf * mult, ngf * mult * 2, inner_block=block, norm=norm)
        self.model = UNetBlock(out_channels, ngf, in_channels=in_channels, inner_block=block,
                               outermost=True, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: `n_layers` stride-2 convs, one stride-1 conv, a 1-channel logit map.

    n_layers=3 is the 70x70 PatchGAN: each output logit sees a 70x70 input patch."""

    def __init__(self, in_channels: int = 3, *, ndf: int = 64, n_layers: int = 3,
                 norm: str = "batch") -> None:
        super().__init__()
        bias = norm == "instance"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias),
                       norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """pix2pix init: conv weights N(0, std), norm weights N(1, std), all biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
