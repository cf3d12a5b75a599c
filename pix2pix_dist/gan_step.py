"""The networks as training uses them, and one pix2pix iteration: a D step, then a G step.

Shared by the training loop and the benchmark, so the benchmark times the real step.

DDP and the BatchNorm discriminator (see ARCHITECTURE.md): D runs twice (fake, then real) before
one backward, so D's DDP wrapper must not broadcast buffers before each forward: that in-place
write to BatchNorm's running statistics invalidates the first forward's saved tensors on CUDA.
D's running statistics are never used (D always runs in training mode), so letting them differ
per rank is harmless. In the G step, D is called *unwrapped* with its parameters frozen: no DDP
reducer is involved, so toggling requires_grad cannot confuse gradient reduction, and no time is
spent on D's weight gradients. G keeps buffer broadcasting: its running statistics are what
inference uses, and rank 0's are saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import Config, ConfigError, OptimConfig
from .losses import d_loss, g_gan_loss, l1_loss
from .models import PatchDiscriminator, UNetGenerator, init_weights


@dataclass
class Networks:
    G_raw: UNetGenerator
    """The plain generator: state_dict, export, sample grids."""
    D_raw: PatchDiscriminator
    """The plain discriminator: state_dict, freezing."""
    G: nn.Module
    """G as the step calls it: compiled if asked, DDP-wrapped when distributed."""
    D: nn.Module
    """D for the D step: compiled if asked, DDP-wrapped when distributed."""
    D_local: nn.Module
    """D for the G step: compiled if asked, never DDP-wrapped (see the module docstring)."""
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    memory_format: torch.memory_format
    """channels_last on CUDA (when enabled), else contiguous."""


def build_models(cfg: Config) -> tuple[UNetGenerator, PatchDiscriminator]:
    m = cfg.model
    generator = UNetGenerator(1, 2, num_downs=m.num_downs, ngf=m.ngf, norm=m.norm, dropout=m.dropout)
    discriminator = PatchDiscriminator(3, ndf=m.ndf, n_layers=m.d_layers, norm=m.norm)
    init_weights(generator)
    init_weights(discriminator)
    return generator, discriminator


def build_networks(cfg: Config, accelerator) -> Networks:
    """Models (pix2pix init), Adam optimizers, compile and DDP via `accelerator.prepare`."""
    device, world = accelerator.device, accelerator.num_processes
    G_raw, D_raw = build_models(cfg)
    if cfg.model.norm == "syncbatch" and world > 1:
        if device.type != "cuda":
            raise ConfigError("model.norm=syncbatch needs GPUs (torch's SyncBatchNorm has no CPU "
                              "kernel); use model.norm=batch")
        G_raw = nn.SyncBatchNorm.convert_sync_batchnorm(G_raw)
        D_raw = nn.SyncBatchNorm.convert_sync_batchnorm(D_raw)
    memory_format = torch.channels_last if (cfg.train.channels_last and device.type == "cuda") \
        else torch.contiguous_format
    G_raw.to(device, memory_format=memory_format)
    D_raw.to(device, memory_format=memory_format)
    fused = device.type == "cuda"
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_G = torch.optim.Adam(G_raw.parameters(), lr=cfg.optim.lr, betas=betas, fused=fused)
    opt_D = torch.optim.Adam(D_raw.parameters(), lr=cfg.optim.lr, betas=betas, fused=fused)
    G_fast = torch.compile(G_raw) if cfg.train.compile else G_raw
    D_fast = torch.compile(D_raw) if cfg.train.compile else D_raw
    G, D, opt_G, opt_D = accelerator.prepare(G_fast, D_fast, opt_G, opt_D)
    if hasattr(D, "broadcast_buffers"):  # DDP-wrapped: see the module docstring
        D.broadcast_buffers = False
    return Networks(G_raw, D_raw, G, D, D_fast, opt_G, opt_D, memory_format)


@dataclass
class StepResult:
    loss_D_real: torch.Tensor
    loss_D_fake: torch.Tensor
    loss_G_GAN: torch.Tensor
    loss_G_L1: torch.Tensor
    d_ok: bool
    """D's loss was finite on every rank (else its update was skipped everywhere)."""
    g_ok: bool
    """G's loss was finite on every rank (else its update was skipped everywhere)."""
    stop: bool
    """Some rank asked to stop: all ranks leave the loop after this step."""

    def losses(self) -> dict[str, torch.Tensor]:
        return {"loss/D_real": self.loss_D_real, "loss/D_fake": self.loss_D_fake,
                "loss/G_GAN": self.loss_G_GAN, "loss/G_L1": self.loss_G_L1}


class GanStep:
    """One pix2pix iteration on a batch (L, ab), in the reference's order: G forward; D step on
    real pairs -> 1 and generated pairs -> 0 with the loss halved; G step against the updated,
    frozen D plus lambda * L1."""

    def __init__(self, accelerator, nets: Networks, optim: OptimConfig) -> None:
        self.accelerator, self.nets, self.optim = accelerator, nets, optim

    def __call__(self, L: torch.Tensor, ab: torch.Tensor, stop: bool = False) -> StepResult:
        acc, n, mode = self.accelerator, self.nets, self.optim.gan_mode
        L = L.contiguous(memory_format=n.memory_format)
        ab = ab.contiguous(memory_format=n.memory_format)

        with acc.autocast():
            fake_ab = n.G(L)
            pred_fake = n.D(torch.cat([L, fake_ab.detach()], dim=1))
            pred_real = n.D(torch.cat([L, ab], dim=1))
        loss_D_real, loss_D_fake = d_loss(mode, pred_real, pred_fake)
        loss_D = 0.5 * (loss_D_real + loss_D_fake)
        # Backward even when the loss is not finite: every rank must join the same gradient
        # all-reduce; the update is then skipped on all ranks together.
        acc.backward(loss_D)
        d_ok = _all_finite(acc, loss_D)[0]
        if d_ok:
            n.opt_D.step()
        n.opt_D.zero_grad(set_to_none=True)

        n.D_raw.requires_grad_(False)
        with acc.autocast():
            pred = n.D_local(torch.cat([L, fake_ab], dim=1))
        loss_G_GAN = g_gan_loss(mode, pred)
        loss_G_L1 = l1_loss(fake_ab, ab)
        acc.backward(loss_G_GAN + self.optim.lambda_l1 * loss_G_L1)
        n.D_raw.requires_grad_(True)
        g_ok, stop_any = _all_finite(acc, loss_G_GAN + loss_G_L1, stop)
        if g_ok:
            n.opt_G.step()
        n.opt_G.zero_grad(set_to_none=True)
        return StepResult(loss_D_real.detach(), loss_D_fake.detach(), loss_G_GAN.detach(),
                          loss_G_L1.detach(), d_ok, g_ok, stop_any)


def _all_finite(accelerator, loss: torch.Tensor, stop: bool = False) -> tuple[bool, bool]:
    """(loss finite on every rank, any rank asked to stop), with one small all-reduce.

    Called after each of the two backward passes; these are the step's host synchronisations."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                         torch.tensor(float(stop), device=loss.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad, stop_any = (flags > 0).tolist()
    return not bad, stop_any
