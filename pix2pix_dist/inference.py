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

import functools
import math
import random
import zlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.lab import one_cpu_thread, uint8_to_lab
from .data.geometry import Augment, resize_to, resized_shape
from .export import InferenceSettings, NormMode
from .generators import build_generator

MIN_SIDE = 16
"""Inputs need a shorter side of at least this many pixels ..."""
MAX_ASPECT = 8
"""... and at most this ratio of long to short side (a 1x2000 strip has nothing to colorize,
and scaling its short side to 256 would ask for a 512000-pixel-wide network input)."""
CHUNK_PIXELS = 1 << 19
"""Full-resolution pixels read, converted and written at a time: no full-resolution float copy
of a photo ever exists (a strip's temporaries, about 40 bytes per pixel, stay near 20 MB)."""

RowReader = Callable[[int, int], Tensor]
"""read(top, bottom) -> uint8 (bottom - top, W, 3) RGB rows of a full-resolution image."""


class GeometryError(ValueError):
    """An image the network cannot take (too small or too thin); one line."""


def image_seed(name: str) -> int:
    """Dropout seed of one image in `batch` norm mode, from its name (key or relative path)."""
    return zlib.crc32(name.encode("utf-8", "surrogateescape"))


def inference_copy(generator: nn.Module, model_args: dict) -> nn.Module:
    """A plain copy of a training generator (`model_args`: its export metadata): `batch` mode
    must not update the training model's running statistics, and a cross-process BatchNorm
    generator (model.norm=batch on several processes) cannot run on one rank alone."""
    copy = build_generator(model_args)
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
    h, w = resized_shape(height, width, settings.crop_size, settings.resize)
    return h, w, math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple


def chunk_rows(width: int) -> int:
    """Rows per strip of a `width`-pixel-wide image."""
    return max(1, CHUNK_PIXELS // width)


def tensor_rows(rgb: Tensor) -> RowReader:
    """A RowReader over a uint8 (3,H,W) tensor."""
    return lambda top, bottom: rgb[:, top:bottom].permute(1, 2, 0)


def model_input(rgb: Tensor, settings: InferenceSettings, multiple: int) -> tuple[Tensor, int, int]:
    """uint8 (3,H,W) -> (normalised L (1,1,ph,pw) reflect-padded, h, w before padding)."""
    return model_input_rows(tensor_rows(rgb), rgb.shape[-2], rgb.shape[-1], settings, multiple,
                            rgb.device)


def model_input_rows(read: RowReader, height: int, width: int, settings: InferenceSettings,
                     multiple: int, device: torch.device) -> tuple[Tensor, int, int]:
    """model_input from row strips: validation's resize (without its crop) as its horizontal
    pass strip by strip, then its vertical pass on the narrow result. On the CPU that is the
    whole-image resize exactly (torch's uint8 resize makes the same two passes, rounding in
    between); on CUDA (float) within one level."""
    h, w, ph, pw = model_shape(height, width, settings, multiple)
    rows = chunk_rows(width)
    narrow = torch.cat([resize_to(read(top, min(top + rows, height)).to(device).permute(2, 0, 1), min(rows, height - top), w)
                        for top in range(0, height, rows)], dim=1)
    L, _ = uint8_to_lab(resize_to(narrow, h, w)[None])
    # The padding is shorter than the image side (it is < multiple <= crop size <= h, w).
    return F.pad(L, (0, pw - w, 0, ph - h), mode="reflect"), h, w


class FullResAb:
    """Predicted ab (2,h,w, normalised) bilinearly resized to (height, width), a strip of rows at
    a time: F.interpolate's align_corners=False weights, applied across the width once (a small
    (2,h,width) map) and along the height per strip, so the (2,H,W) float map never exists."""

    def __init__(self, ab: Tensor, height: int, width: int) -> None:
        h = ab.shape[-2]
        self.wide = F.interpolate(ab[None].float(), size=(h, width), mode="bilinear",
                                  align_corners=False)[0]
        src = ((torch.arange(height, dtype=torch.float32, device=ab.device) + 0.5) * (h / height) - 0.5).clamp_(min=0)
        self.y0 = src.long().clamp_(max=h - 1)
        self.y1 = (self.y0 + 1).clamp_(max=h - 1)
        self.frac = (src - self.y0)[:, None]

    def rows(self, top: int, bottom: int) -> Tensor:
        """(2, bottom - top, width) float32."""
        y0, y1, frac = self.y0[top:bottom], self.y1[top:bottom], self.frac[top:bottom]
        lo, hi = self.wide[:, y0], self.wide[:, y1]
        return lo.add_((hi - lo).mul_(frac))


def compose(rgb: Tensor, ab: Tensor) -> Tensor:
    """The input's own full-resolution L with `ab` (2,h,w normalised) resized to it: uint8
    (3,H,W) in, uint8 (3,H,W) out, in row strips of about CHUNK_PIXELS."""
    out = torch.empty_like(rgb)

    def write(top: int, rows: Tensor) -> None:
        out[:, top:top + rows.shape[0]] = rows.permute(2, 0, 1)

    compose_rows(tensor_rows(rgb), write, rgb.shape[-2], rgb.shape[-1], ab)
    return out


def compose_rows(read: RowReader, write: Callable[[int, Tensor], None], height: int, width: int,
                 ab: Tensor) -> None:
    """compose, a strip at a time: write(top, uint8 (r,W,3) rows on ab's device) for each strip
    `read` gives, so the caller decides where full-resolution pixels live (colorize writes them
    back over the decoded image: no second full-size copy)."""
    full_ab = FullResAb(ab, height, width)
    rows = chunk_rows(width)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        with one_cpu_thread(ab.device):
            colour = color_rows(read(top, bottom).to(ab.device), full_ab.rows(top, bottom))
        write(top, colour)


# Lab -> RGB at full resolution: the arithmetic of data/lab.py (Kornia's D65 constants), on
# uint8 pixels, with tables where the input is discrete. Kornia's path takes ~20 float32
# temporaries and three pow() calls per pixel; this one (sRGB decode and encode as tables, the
# lightness Y taken from the input instead of round-tripping it through L) is ~10x faster and
# agrees within one level of 255 (tests/test_colorize.py).
_WHITE_X, _WHITE_Z = 0.95047, 1.08883
_RGB_TO_Y = (0.212671, 0.715160, 0.072169)
_XYZ_TO_RGB = ((3.2404813432005266, -1.5371515162713185, -0.4985363261688878),
               (-0.9692549499965682, 1.8759900014898907, 0.0415559265582928),
               (0.0556466391351772, -0.2040413383665112, 1.0573110696453443))
_ENCODE_STEPS = 1 << 18
"""Entries of the linear -> sRGB uint8 table: fine enough to round like the formula."""


@functools.cache
def _tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """(uint8 sRGB value -> its share of Y, per channel: (3, 256)), (linear -> uint8 sRGB)."""
    v = torch.arange(256, dtype=torch.float64) / 255
    linear = torch.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
    x = torch.arange(_ENCODE_STEPS + 1, dtype=torch.float64) / _ENCODE_STEPS
    srgb = torch.where(x > 0.0031308, 1.055 * x ** (1 / 2.4) - 0.055, 12.92 * x)
    luminance = torch.tensor(_RGB_TO_Y, dtype=torch.float64)[:, None] * linear
    return luminance.float().to(device), srgb.mul(255).round().to(torch.uint8).to(device)


def _f_inverse(f: Tensor) -> Tensor:
    return torch.where(f > 0.2068966, f * f * f, f.sub_(4.0 / 29.0).div_(7.787))


def color_rows(rgb: Tensor, ab: Tensor) -> Tensor:
    """uint8 (r,W,3) RGB rows and normalised ab (2,r,W) -> uint8 (r,W,3): the rows' own
    lightness with the given colour (lab_to_rgb of the rows' L and `ab`, as uint8)."""
    luminance, encode = _tables(rgb.device)
    Y = _lookup(luminance[0], rgb[..., 0])  # one channel at a time: fewer bytes per pixel live
    Y += _lookup(luminance[1], rgb[..., 1])
    Y += _lookup(luminance[2], rgb[..., 2])
    fy = torch.where(Y > 0.008856, Y.clamp(min=0.008856).pow_(1 / 3), Y * 7.787 + 4.0 / 29.0)
    X = _f_inverse(torch.add(fy, ab[0], alpha=110.0 / 500.0)).mul_(_WHITE_X)
    Z = _f_inverse(torch.add(fy, ab[1], alpha=-110.0 / 200.0).clamp_(min=0.0)).mul_(_WHITE_Z)
    del fy
    out = torch.empty_like(rgb)
    for channel, (mx, my, mz) in enumerate(_XYZ_TO_RGB):
        linear = X * mx
        linear.add_(Y, alpha=my).add_(Z, alpha=mz).clamp_(0.0, 1.0).mul_(_ENCODE_STEPS).add_(0.5)
        out[..., channel] = _lookup(encode, linear)  # truncation of x >= 0.5: rounding
    return out


def _lookup(table: Tensor, index: Tensor) -> Tensor:
    """table[index] for an index of any shape and dtype (a float one is truncated): index_select
    with int32 indices, the same values as torch.take with int64 ones in about half the time
    (the colour step went from ~39 to ~22 ns per pixel on one thread)."""
    return table.index_select(0, index.int().reshape(-1)).view(index.shape)
