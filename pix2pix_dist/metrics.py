"""Colorization metrics of one (prediction, truth) pair of uint8 RGB images.

- PSNR and SSIM: scikit-image's `peak_signal_noise_ratio` and `structural_similarity` on RGB
  in [0, 1] (data_range 1; SSIM with its defaults: 7x7 uniform window, per channel, averaged).
  PSNR of identical images is infinite; it is capped at PSNR_CAP so averages stay finite.
- ab-L1: mean absolute difference of the a and b channels over all pixels (both channels
  averaged), in CIE Lab units, with scikit-image's `rgb2lab` (D65).
  It is measured on the rendered RGB images, i.e. after gamut clipping and uint8 rounding: what
  a user sees.
- Colourfulness: Hasler & Süsstrunk, "Measuring colourfulness in natural images", SPIE 2003:
  rg = R - G, yb = (R + G)/2 - B on 0..255 values,
  CF = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2).
  dCF = CF(truth) - CF(prediction): positive when the prediction is duller than the truth
  (pix2pix-style models desaturate), zero when it is as colourful.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

PSNR_CAP = 100.0
METRICS = ("psnr", "ssim", "ab_l1", "cf_pred", "cf_truth", "dcf")
"""The keys of image_metrics(), in report order."""


def _unit(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) / 255.0


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    """dB; uint8 (H,W,3) inputs."""
    with np.errstate(divide="ignore"):
        value = peak_signal_noise_ratio(_unit(truth), _unit(pred), data_range=1.0)
    return float(min(value, PSNR_CAP))


def ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean SSIM over the RGB channels; uint8 (H,W,3) inputs at least 7x7."""
    return float(structural_similarity(_unit(truth), _unit(pred), data_range=1.0, channel_axis=2))


def ab_l1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute ab error in Lab units; uint8 (H,W,3) inputs."""
    return float(np.abs(rgb2lab(_unit(pred))[..., 1:] - rgb2lab(_unit(truth))[..., 1:]).mean())


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003) colourfulness of a uint8 (H,W,3) image."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def image_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Every metric of METRICS for one pair of uint8 (H,W,3) images of the same size."""
    cf_pred, cf_truth = colourfulness(pred), colourfulness(truth)
    return {"psnr": psnr(pred, truth), "ssim": ssim(pred, truth), "ab_l1": ab_l1(pred, truth),
            "cf_pred": cf_pred, "cf_truth": cf_truth, "dcf": cf_truth - cf_pred}


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key average over images (NaN for no images)."""
    return {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in METRICS}
