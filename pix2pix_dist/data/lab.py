"""RGB <-> Lab on the torch side (DALI has no Lab), normalised as in pix2pix: L/50-1, ab/110.

Kornia computes RGB->XYZ with conv2d, which autocast would run in bf16/fp16: both directions
run in fp32 with autocast disabled. RGB is clamped to [0, 1] first because the sRGB gamma
curve gives NaN for negative values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import kornia
import torch
from torch import Tensor


def rgb_to_lab(rgb01: Tensor) -> tuple[Tensor, Tensor]:
    """(B,3,H,W) RGB in [0,1] -> (L/50-1 as (B,1,H,W), ab/110 as (B,2,H,W)), float32."""
    with torch.autocast(rgb01.device.type, enabled=False):
        lab = kornia.color.rgb_to_lab(rgb01.float().clamp(0.0, 1.0))
    return (lab[:, :1] / 50.0 - 1.0).contiguous(), (lab[:, 1:] / 110.0).contiguous()


def lab_to_rgb(L_norm: Tensor, ab_norm: Tensor) -> Tensor:
    """Inverse of rgb_to_lab: (B,1,H,W) and (B,2,H,W) normalised Lab -> (B,3,H,W) RGB in [0,1]."""
    with torch.autocast(L_norm.device.type, enabled=False):
        lab = torch.cat([(L_norm.float() + 1.0) * 50.0, ab_norm.float() * 110.0], dim=1)
        return kornia.color.lab_to_rgb(lab, clip=True).clamp(0.0, 1.0)


def uint8_to_lab(rgb: Tensor) -> tuple[Tensor, Tensor]:
    """A (B,3,H,W) uint8 batch straight from a backend -> normalised (L, ab)."""
    return rgb_to_lab(rgb.float().div_(255.0))


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Torch ops inside run on one intra-op thread when `device` is the CPU (the setting is
    restored after). For per-pixel colour work beside other busy threads (DALI's, DataLoader
    workers, other jobs): a small op split over busy cores waits at every barrier. Measured on
    2 cores: Lab of an 8x128x128 batch 255 ms with 2 threads, 34 ms with one; colorize's
    full-resolution colour of a 24 MP photo 7.2 s with 2, 1.2 s with one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
