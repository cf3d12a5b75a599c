"""What training sees, in one place: JPEG decode and the pix2pix/tutorial geometry (resize,
crop, flip) on uint8 (3,H,W) tensors, CPU or CUDA.

Imported by both input backends (the DALI pipeline mirrors this geometry with its own
operators), by validation, evaluation and inference, so a change here changes every one of them.
Only torch and torchvision: inference imports it without webdataset or the DataLoader.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg


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
        if not self.train:  # training's resize, then the centre crop
            return TF.center_crop(resize(img, self.load_size, self.resize), [size, size]).contiguous()
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


def resize(img: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """`shorter_side`: the shorter side to `side`, aspect ratio kept; `square`: the whole image to
    side x side. Bicubic, antialiased (PIL's BICUBIC), as pix2pix's and the tutorial's resize."""
    size = [side, side] if mode == "square" else [side]
    return TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def decode(data: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """JPEG bytes (uint8 1-D) -> uint8 (3,H,W) RGB; raises RuntimeError on a corrupt file."""
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

