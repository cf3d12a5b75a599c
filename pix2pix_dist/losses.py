"""GAN losses (vanilla, lsgan, hinge) and the pix2pix objective pieces.

Computed in fp32: the logits may come out of bf16 autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gan_loss(mode: str, logits: torch.Tensor, real: bool) -> torch.Tensor:
    """The loss of patch logits judged against the label real (1) or fake (0)."""
    x = logits.float()
    if mode == "hinge":
        return F.relu(1.0 - x if real else 1.0 + x).mean()
    target = torch.full_like(x, float(real))
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(x, target)
    if mode == "lsgan":
        return F.mse_loss(x, target)
    raise ValueError(f"unknown gan mode {mode!r}")


def d_loss(mode: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Discriminator loss on real and fake patch logits, each returned separately.

    pix2pix halves their sum (D learns slower than G): the caller adds them and halves that."""
    return _gan_loss(mode, real_logits, True), _gan_loss(mode, fake_logits, False)


def g_gan_loss(mode: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial loss: make D call the fakes real (hinge: raise their logits)."""
    return -fake_logits.float().mean() if mode == "hinge" else _gan_loss(mode, fake_logits, True)


def l1_loss(fake_ab: torch.Tensor, real_ab: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(fake_ab.float(), real_ab.float())
