"""Inference that sees images the way training did: geometry, norm mode, full-resolution output.

Used by colorize, evaluate and the training loop's sample grids and evaluation; the reasons for
each rule are in docs/design.md ("Evaluation and inference").

- Geometry: training resizes the shorter side (`shorter_side`) or squashes the whole image
  (`square`) to the load size, then crops. The training-resolution view (evaluation, sample
  grids) is validation's: the same resize, the centre crop. At full resolution, inference
  scales the shorter side to the training crop size keeping the aspect ratio (or squashes, for
  `square`: the whole photo, not a crop), reflect-pads the long side to a multiple of
  2**num_downs, predicts ab, drops the padding, resizes ab to the input's full resolution and
  combines it with the input's own full-resolution L.
- Norm mode: `eval` runs BatchNorm on its running statistics without dropout, batched;
  `batch` runs each image alone with BatchNorm on its own statistics and dropout on (pix2pix's
  test mode), with dropout noise seeded from the image's name so results do not depend on
  batching, on the number of processes, or on what ran before.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.lab import lab_to_rgb, uint8_to_lab
from .data.geometry import Augment, resize
from .export import InferenceSettings, NormMode
from .models import UNetGenerator

MIN_SIDE = 16
"""Inputs need a shorter side of at least this many pixels ..."""
MAX_ASPECT = 8
"""... and at most this ratio of long to short side (a 1x2000 strip has nothing to colorize,
and scaling its short side to 256 would ask for a 512000-pixel-wide network input)."""
CHUNK_PIXELS = 1 << 17
"""Full-resolution pixels converted at a time: a 24 MP photo never exists as float32 RGB/Lab.
Kornia's Lab conversions make ~20 float32 temporaries per pixel, so this keeps them near 50 MB."""


class GeometryError(ValueError):
    """An image the network cannot take (too small or too thin); one line."""


def image_seed(name: str) -> int:
    """Dropout seed of one image in `batch` norm mode, from its name (key or relative path)."""
    return zlib.crc32(name.encode("utf-8", "surrogateescape"))


def inference_copy(generator: nn.Module, model_args: dict) -> UNetGenerator:
    """A plain copy of a training generator: `batch` mode must not update the training model's
    running statistics, and a cross-process BatchNorm generator (model.norm=batch on several
    processes) cannot run on one rank alone."""
    copy = UNetGenerator(**model_args)
    copy.load_state_dict(generator.state_dict())
    return copy.to(next(generator.parameters()).device)


@torch.no_grad()
def predict_ab(generator: nn.Module, L: Tensor, mode: NormMode, seeds: Sequence[int]) -> Tensor:
    """(B,1,h,w) normalised L -> (B,2,h,w) normalised ab, float32, in `mode`; the generator's
    train/eval flag is restored afterwards."""
    was_training = generator.training
    generator.train(mode == "batch")
    try:
        if mode == "eval":
            return generator(L).float()
        outs = []
        devices = [L.device] if L.device.type == "cuda" else []
        for i, seed in enumerate(seeds):
            with torch.random.fork_rng(devices=devices):  # leave the caller's RNG untouched
                torch.manual_seed(seed)
                outs.append(generator(L[i:i + 1]).float())
        return torch.cat(outs)
    finally:
        generator.train(was_training)


def training_view(rgb: Tensor, settings: InferenceSettings) -> Tensor:
    """What validation batches show the network: uint8 (3,H,W) -> uint8 (3,S,S), S = crop size
    (the input pipelines' own validation transform: training's resize, the centre crop)."""
    size = settings.crop_size
    view = Augment(crop_size=size, load_size=settings.load_size or size, train=False, flip=False,
                   random_resized_crop=False, rrc_min_scale=1.0, resize=settings.resize)
    return view(rgb, random.Random(0))  # validation draws nothing from the generator


def model_shape(height: int, width: int, settings: InferenceSettings, multiple: int
                ) -> tuple[int, int, int, int]:
    """(h, w) the image is resized to, and (padded h, padded w) the network sees."""
    short, long_ = min(height, width), max(height, width)
    if short < MIN_SIDE or long_ > MAX_ASPECT * short:
        raise GeometryError(f"{width}x{height} pixels: inputs need a shorter side of at least "
                            f"{MIN_SIDE} px and an aspect ratio of at most {MAX_ASPECT}:1")
    size = settings.crop_size
    if settings.resize == "square":
        return size, size, size, size
    # torchvision's rule for resize(img, [size]): the long side is truncated, not rounded.
    h, w = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    return h, w, math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple


def model_input(rgb: Tensor, settings: InferenceSettings, multiple: int) -> tuple[Tensor, int, int]:
    """uint8 (3,H,W) -> (normalised L (1,1,ph,pw) reflect-padded, h, w before padding)."""
    h, w, ph, pw = model_shape(rgb.shape[-2], rgb.shape[-1], settings, multiple)
    small = resize(rgb, settings.crop_size, settings.resize)  # validation's, without its crop
    L, _ = uint8_to_lab(small[None])
    # The padding is shorter than the image side (it is < multiple <= crop size <= h, w).
    return F.pad(L, (0, pw - w, 0, ph - h), mode="reflect"), h, w


def compose(rgb: Tensor, ab: Tensor) -> Tensor:
    """The input's own full-resolution L with `ab` (2,h,w normalised) resized to it: uint8
    (3,H,W) in, uint8 (3,H,W) out, converted in row chunks of about CHUNK_PIXELS."""
    height, width = rgb.shape[-2:]
    ab_full = F.interpolate(ab[None].float(), size=(height, width), mode="bilinear",
                            align_corners=False)
    out = torch.empty_like(rgb)
    rows = max(1, CHUNK_PIXELS // width)
    for top in range(0, height, rows):
        L, _ = uint8_to_lab(rgb[None, :, top:top + rows])
        part = lab_to_rgb(L, ab_full[:, :, top:top + rows])
        out[:, top:top + rows] = part[0].mul_(255).round_().to(torch.uint8)
    return out
