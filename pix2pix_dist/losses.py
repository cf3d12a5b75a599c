"""GAN losses (vanilla, lsgan, hinge) and the pix2pix objective pieces."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(mode: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Discriminator loss on real and fake patch logits, each returned separately.

    pix2pix halves their sum (D learns slower than G); the caller adds them and multiplies by 0.5.
    Computed in fp32: the logits may come out of bf16 autocast."""
    real, fake = real_logits.float(), fake_logits.float()
    if mode == "vanilla":
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real)),
                F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    if mode == "lsgan":
        return F.mse_loss(real, torch.ones_like(real)), F.mse_loss(fake, torch.zeros_like(fake))
    if mode == "hinge":
        return F.relu(1.0 - real).mean(), F.relu(1.0 + fake).mean()
    raise ValueError(f"unknown gan mode {mode!r}")


def g_gan_loss(mode: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial loss: make D call the fakes real."""
    fake = fake_logits.float()
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if mode == "lsgan":
        return F.mse_loss(fake, torch.ones_like(fake))
    if mode == "hinge":
        return -fake.mean()
    raise ValueError(f"unknown gan mode {mode!r}")


def l1_loss(fake_ab: torch.Tensor, real_ab: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(fake_ab.float(), real_ab.float())
