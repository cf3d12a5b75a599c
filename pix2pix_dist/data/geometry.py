"""What training sees, in one place: JPEG decode and the pix2pix/tutorial geometry (resize,
crop, flip) on uint8 (3,H,W) tensors, CPU or CUDA.

Imported by both input backends (the DALI pipeline mirrors this geometry with its own
operators), by validation, evaluation and inference, so a change here changes every one of them.
Only torch, and torchvision imported where it is used (decode and the training crops): importing
torchvision imports torch._dynamo, about 180 MB of memory and seconds of start-up that
inference (colorize, which validation's `resize` serves) never needs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """pix2pix augmentation for one sample, on CPU or CUDA uint8 (3,H,W) tensors, with the same
    geometry as dali_pipeline.py: training resizes (`resize` below) to load_size and takes a
    random S x S crop (or a random-resized crop), then flips; validation resizes the same way
    and takes the centre S x S crop, without a flip (the pix2pix reference's test view, whose
    crop is random; a `square` image with load_size = S is shown whole)."""

    crop_size: int
    load_size: int
    train: bool
    flip: bool
    random_resized_crop: bool
    rrc_min_scale: float
    resize: str = "shorter_side"

    def __call__(self, img: torch.Tensor, rng: random.Random) -> torch.Tensor:
        size = self.crop_size
        if not self.train:  # training's resize, then the centre crop (torchvision's anchor)
            img = resize(img, self.load_size, self.resize)  # both sides >= S now
            top, left = (int(round((side - size) / 2.0)) for side in img.shape[-2:])
            return img[..., top:top + size, left:left + size].contiguous()
        import torchvision.transforms.v2.functional as TF

        if self.random_resized_crop:
            top, left, h, w = self._rrc_window(img.shape[-2], img.shape[-1], rng)
            img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        else:
            img = resize(img, self.load_size, self.resize)
            top = rng.randint(0, img.shape[-2] - size)
            left = rng.randint(0, img.shape[-1] - size)
            img = TF.crop(img, top, left, size, size)
        if self.flip and rng.random() < 0.5:
            img = TF.horizontal_flip(img)
        return img.contiguous()

    def _rrc_window(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop.get_params with our generator (and DALI's defaults).
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(self.rrc_min_scale, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side


def resized_shape(height: int, width: int, side: int, mode: str) -> tuple[int, int]:
    """(h, w) of `resize`: torchvision's rule for resize(img, [side]) truncates the long side."""
    if mode == "square":
        return side, side
    return (side, int(side * width / height)) if height <= width else (int(side * height / width), side)


def resize(img: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """`shorter_side`: the shorter side to `side`, aspect ratio kept; `square`: the whole image to
    side x side. Bicubic, antialiased (PIL's BICUBIC), as pix2pix's and the tutorial's resize.
    torchvision's resize, without importing it: uint8 natively on the CPU (separable, horizontal
    pass first, as PIL), through float32 with rounding on CUDA (tests/test_data.py checks it)."""
    return resize_to(img, *resized_shape(img.shape[-2], img.shape[-1], side, mode))


def resize_to(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> (..., 3, height, width), the bicubic antialiased resize above."""
    if tuple(img.shape[-2:]) == (height, width):
        return img
    x = img.reshape(-1, *img.shape[-3:])
    native = img.device.type == "cpu"
    out = F.interpolate(x if native else x.float(), size=[height, width], mode="bicubic",
                        align_corners=False, antialias=True)
    if not native:
        out = out.clamp_(0, 255).round_().to(torch.uint8)
    return out.reshape(*img.shape[:-2], height, width)


def decode(data: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """JPEG bytes (uint8 1-D) -> uint8 (3,H,W) RGB; raises RuntimeError on a corrupt file."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

