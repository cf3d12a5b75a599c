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
- FID (over a set of images) and LPIPS (per image), only when local weights are given: see
  FID_WEIGHTS and LPIPS_FILES.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from skimage.color import rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from .errors import UserError
from .imageio import first_line

PSNR_CAP = 100.0
METRICS = {"psnr": "PSNR dB", "ssim": "SSIM", "ab_l1": "ab-L1", "cf_pred": "CF pred",
           "cf_truth": "CF truth", "dcf": "dCF"}
"""The keys of image_metrics(), in report order, with their report table headers."""


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


# --- FID (only with local weights) -------------------------------------------------------------

FID_WEIGHTS = "inception_v3_google-0cc3c7bd.pth"
"""torchvision's Inception v3 ImageNet weights (IMAGENET1K_V1), under this file name (the one
torchvision's own download uses) in --weights-dir. Features are its 2048-d pool output, so the
values are not comparable with papers' FIDs, which use the TF-Inception port (pytorch-fid)."""


def fid_network(weights_dir: Path | None, device: torch.device) -> nn.Module | None:
    """Inception v3 feature extractor from `weights_dir`, or None when the file is not there
    (never downloaded). A file that is not those weights raises UserError (one line)."""
    from torchvision.models import Inception3

    if weights_dir is None or not (path := Path(weights_dir) / FID_WEIGHTS).is_file():
        return None
    net = Inception3(aux_logits=True, transform_input=True, init_weights=False)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # wrong file, damaged file, pickled code (refused by weights_only)
        raise UserError(f"{path} is not torchvision's Inception v3 weights: {first_line(exc)}",
                        all_ranks=True) from None
    net.fc = nn.Identity()  # the 2048-d pool features, as FID uses
    return net.eval().to(device)


def fid_features(net: nn.Module, rgb: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) uint8 -> (B,2048) float64 features (299x299, ImageNet normalisation, as the
    weights were trained)."""
    x = TF.resize(rgb, [299, 299], antialias=True).float().div_(255)
    x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        return net(x).double().cpu().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (Heusel et al. 2017):
    |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b, computed
    exactly without a general matrix square root (scipy's sqrtm of 2048x2048 takes minutes on
    a small CPU): for fewer samples than dimensions, as the nuclear norm of A B^T / sqrt(n_a n_b)
    (A, B the centred features); otherwise from symmetric eigendecompositions."""
    a_c, b_c = a - a.mean(axis=0), b - b.mean(axis=0)
    n_a, n_b = len(a) - 1, len(b) - 1
    if min(len(a), len(b)) <= a.shape[1]:
        trace_root = np.linalg.svd(a_c @ b_c.T / np.sqrt(n_a * n_b), compute_uv=False).sum()
    else:
        s_a, s_b = a_c.T @ a_c / n_a, b_c.T @ b_c / n_b
        w, v = np.linalg.eigh(s_a)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    mean_term = ((a.mean(axis=0) - b.mean(axis=0)) ** 2).sum()
    return float(mean_term + (a_c**2).sum() / n_a + (b_c**2).sum() / n_b - 2 * trace_root)


# --- LPIPS (only with local weights) -----------------------------------------------------------

LPIPS_FILES = ("alexnet-owt-7be5be79.pth", "alex.pth")
"""In --weights-dir: torchvision's AlexNet ImageNet weights, and LPIPS v0.1's linear layers for
AlexNet (`lpips/weights/v0.1/alex.pth` in the `lpips` package)."""
_LPIPS_TAPS = (1, 4, 7, 9, 11)  # AlexNet feature indices after relu1..relu5
_LPIPS_CHANNELS = (64, 192, 384, 256, 256)


class Lpips(nn.Module):
    """LPIPS v0.1 with AlexNet (Zhang et al., "The Unreasonable Effectiveness of Deep Features as
    a Perceptual Metric", CVPR 2018; richzhang/PerceptualSimilarity): images scaled to [-1, 1]
    and by its ScalingLayer, features at relu1..5 unit-normalised over channels, squared
    differences weighted by the linear layers, averaged over space, summed over layers."""

    def __init__(self, features: nn.Sequential, lins: list[torch.Tensor]) -> None:
        super().__init__()
        self.features = features[:_LPIPS_TAPS[-1] + 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.lins = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in lins])

    def forward(self, pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) uint8 pairs -> (B,) distances."""
        x = torch.cat([pred, truth]).float().div(127.5).sub(1.0)
        x = (x - self.shift) / self.scale
        total = torch.zeros(len(pred), device=x.device)
        lins = iter(self.lins)
        with torch.no_grad():
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in _LPIPS_TAPS:
                    unit = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                    a, b = unit.chunk(2)
                    total += F.conv2d((a - b).pow(2), next(lins)).mean(dim=(1, 2, 3))
        return total


def lpips_network(weights_dir: Path | None, device: torch.device) -> Lpips | None:
    """LPIPS from the two files of LPIPS_FILES in `weights_dir`, or None when they are not both
    there (never downloaded). Files that are not those weights raise UserError (one line)."""
    from torchvision.models import alexnet

    paths = [Path(weights_dir) / name for name in LPIPS_FILES] if weights_dir is not None else []
    if not paths or not all(p.is_file() for p in paths):
        return None
    try:
        net = alexnet(weights=None)
        net.load_state_dict(torch.load(paths[0], map_location="cpu", weights_only=True))
        lin_state = torch.load(paths[1], map_location="cpu", weights_only=True)
        lins = [lin_state[f"lin{i}.model.1.weight"].float() for i in range(5)]
        if [tuple(w.shape) for w in lins] != [(1, c, 1, 1) for c in _LPIPS_CHANNELS]:
            raise ValueError("linear layers of the wrong shapes")
    except Exception as exc:  # wrong, damaged or pickled-code files (refused by weights_only)
        raise UserError(f"{paths[0]} and {paths[1]} are not AlexNet and LPIPS v0.1 weights: "
                        f"{first_line(exc)}", all_ranks=True) from None
    return Lpips(net.features, lins).eval().to(device)
