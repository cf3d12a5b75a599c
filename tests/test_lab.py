"""Lab conversion against scikit-image on real photos, round trip, clamping, autocast."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.color
import skimage.data
import torch

from pix2pix_dist.data import lab_to_rgb, rgb_to_lab


def _photo_batch() -> torch.Tensor:
    """Three of scikit-image's colour photos, cropped to 128x128, as (3,3,128,128) in [0,1]."""
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    crops = [p[100:228, 100:228] for p in photos]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0


def test_matches_skimage_rgb2lab_on_photos():
    rgb = _photo_batch()
    L, ab = rgb_to_lab(rgb)
    assert L.dtype == ab.dtype == torch.float32
    assert L.shape == (3, 1, 128, 128) and ab.shape == (3, 2, 128, 128)
    ours = torch.cat([(L + 1) * 50, ab * 110], dim=1).permute(0, 2, 3, 1).numpy()
    reference = skimage.color.rgb2lab(rgb.permute(0, 2, 3, 1).double().numpy())
    assert np.abs(ours - reference).max() < 0.5  # L, a, b units
    assert L.min() >= -1 and L.max() <= 1 and ab.abs().max() <= 1


def test_round_trip_recovers_rgb():
    rgb = _photo_batch()
    back = lab_to_rgb(*rgb_to_lab(rgb))
    assert back.shape == rgb.shape and back.dtype == torch.float32
    assert (back - rgb).abs().max() < 2e-3


def test_clamps_input_and_output():
    rgb = _photo_batch()
    noisy = rgb + torch.randn_like(rgb)  # far outside [0, 1]
    L, ab = rgb_to_lab(noisy)
    expected_L, expected_ab = rgb_to_lab(noisy.clamp(0, 1))
    assert torch.isfinite(L).all() and torch.isfinite(ab).all()
    assert torch.equal(L, expected_L) and torch.equal(ab, expected_ab)
    # Saturated ab values fall outside the sRGB gamut: the inverse must still be a valid image.
    out = lab_to_rgb(torch.zeros(1, 1, 4, 4), torch.full((1, 2, 4, 4), 0.9))
    assert out.min() >= 0 and out.max() <= 1


def test_fp32_inside_autocast():
    rgb = _photo_batch()
    L, ab = rgb_to_lab(rgb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        L_auto, ab_auto = rgb_to_lab(rgb.bfloat16())
        back = lab_to_rgb(L_auto, ab_auto)
    assert L_auto.dtype == ab_auto.dtype == back.dtype == torch.float32
    # bf16 input rounding is the only difference; autocast itself must not lower precision.
    assert torch.equal(L_auto, rgb_to_lab(rgb.bfloat16())[0])
    assert (L_auto - L).abs().max() < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu():
    rgb = _photo_batch()
    L, ab = rgb_to_lab(rgb)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        L_gpu, ab_gpu = rgb_to_lab(rgb.cuda())
    assert L_gpu.is_cuda and L_gpu.dtype == torch.float32
    assert (L_gpu.cpu() - L).abs().max() < 1e-4 and (ab_gpu.cpu() - ab).abs().max() < 1e-4
