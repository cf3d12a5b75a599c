"""The networks as training uses them, and one pix2pix iteration: a D step, then a G step.

Shared by the training loop and the benchmark, so the benchmark times the real step. Its speed
levers (fused Adam with an on-device skip, host reads every `train.sync_every` steps, compile,
channels_last, `train.d_concat`) are described in docs/design.md, "The training step on the GPU".

The L1 warm-up (train.l1_warmup_epochs) calls the step with `warmup=True`: G alone with L1, its
own Adam lr and beta1; D is never called, so under DDP its wrapper has nothing to reduce (no
unused-parameter error) and its weights, statistics and Adam state stay bit-identical.

DDP and the BatchNorm discriminator: D's DDP wrapper does not broadcast buffers, and the G step
calls D unwrapped with its parameters frozen; why: docs/design.md, "DDP and the BatchNorm
discriminator".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .config import Config, OptimConfig
from .device_defaults import resolve_train
from .global_batchnorm import convert_to_global_batchnorm
from .losses import d_loss, g_gan_loss, l1_loss
from .generators import build_generator, generator_args
from .models import PatchDiscriminator, UNetGenerator, init_weights


@dataclass
class Networks:
    G_raw: nn.Module
    """The plain generator (generators.build_generator): state_dict, export, sample grids."""
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
    """channels_last when train.channels_last resolves to true (auto: on CUDA), else contiguous."""


def build_networks(cfg: Config, accelerator) -> Networks:
    """Models (pix2pix init; a ResNet-encoder G keeps its own), Adam optimizers, compile and DDP
    via `accelerator.prepare`; the speed settings left `auto` take the accelerator's device's
    defaults (device_defaults.py). Pretrained encoder weights come later, on a fresh start only
    (resnet_unet.load_encoder_weights)."""
    device, world, m = accelerator.device, accelerator.num_processes, cfg.model
    G_raw = build_generator(generator_args(m))
    D_raw = PatchDiscriminator(3, ndf=m.ndf, n_layers=m.d_layers, norm=m.norm)
    if isinstance(G_raw, UNetGenerator):
        init_weights(G_raw)
    init_weights(D_raw)
    if m.norm == "batch" and world > 1:  # statistics over the global batch (global_batchnorm.py)
        G_raw = convert_to_global_batchnorm(G_raw, device)
        D_raw = convert_to_global_batchnorm(D_raw, device)
    train = resolve_train(cfg.train, device.type)
    memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
    G_raw.to(device, memory_format=memory_format)
    D_raw.to(device, memory_format=memory_format)
    adam = functools.partial(torch.optim.Adam, lr=cfg.optim.lr,
                             betas=(cfg.optim.beta1, cfg.optim.beta2), fused=train.fused_adam)
    opt_G, opt_D = adam(G_raw.parameters()), adam(D_raw.parameters())
    # Only the networks are compiled: GanStep's requires_grad toggle and the optimizer steps stay
    # eager, so a toggle can never be baked into a graph (dynamo guards on it and keeps one graph
    # for D with trainable and one with frozen parameters).
    G_fast = torch.compile(G_raw) if train.compile else G_raw
    D_fast = torch.compile(D_raw) if train.compile else D_raw
    G, D, opt_G, opt_D = accelerator.prepare(G_fast, D_fast, opt_G, opt_D)
    if hasattr(D, "broadcast_buffers"):  # DDP-wrapped: see the module docstring
        D.broadcast_buffers = False
    return Networks(G_raw, D_raw, G, D, D_fast, opt_G, opt_D, memory_format)


@dataclass
class StepResult:
    raw_losses: dict[str, torch.Tensor]
    """The step's losses by their logged names (loss/D_real, ...), on the device."""
    ok: torch.Tensor
    """On the device (bool, 0-dim): both losses were finite on every rank, so both updates ran.
    When False, the update whose loss was not finite was skipped on every rank."""
    skipped: int | None
    """Host-read steps only (see GanStep.__call__): steps with a skipped update since the last
    read, this one included; None on other steps."""
    stop: bool = False
    """Host-read steps only: some rank asked to stop, so all ranks leave the loop now."""

    def losses(self) -> dict[str, torch.Tensor]:
        """The step's losses, zero when the step was skipped (so they can be summed on the device
        and averaged over the good steps, whose count `ok` adds up)."""
        return {k: torch.where(self.ok, v, torch.zeros_like(v)) for k, v in self.raw_losses.items()}


class GanStep:
    """One pix2pix iteration on a batch (L, ab), in the reference's order: G forward; D step on
    real pairs -> 1 and generated pairs -> 0 with the loss halved; G step against the updated,
    frozen D plus lambda * L1.

    A loss that is not finite on some rank skips that network's update on every rank. With fused
    Adam (and no fp16 loss scaler) the skip happens on the device: the optimizer gets the
    all-reduced flag as `found_inf`, as under a GradScaler, so no step waits for the GPU. Plain
    Adam cannot take that flag, so the host reads it after each backward pass (two syncs)."""

    def __init__(self, accelerator, nets: Networks, optim: OptimConfig, *,
                 d_concat: bool = False) -> None:
        self.accelerator, self.nets, self.optim, self.d_concat = accelerator, nets, optim, d_concat
        fused = all(g.get("fused") for opt in (nets.opt_G, nets.opt_D) for g in opt.param_groups)
        self.skip_on_device = fused and accelerator.scaler is None
        self._skipped = torch.zeros((), dtype=torch.int64, device=accelerator.device)

    def set_lr(self, lr: float, warmup: bool = False) -> None:
        """The learning rate of the next update(s); in the warm-up, G's Adam also takes
        optim.warmup_beta1 (the GAN phase optim.beta1)."""
        beta1 = self.optim.warmup_beta1 if warmup else self.optim.beta1
        for opt in (self.nets.opt_G, self.nets.opt_D):
            for group in opt.param_groups:
                group["lr"] = lr
        for group in self.nets.opt_G.param_groups:
            group["betas"] = (beta1, self.optim.beta2)

    def restart_g_optimizer(self) -> None:
        """Forget G's Adam moments and step count: the GAN phase after a warm-up starts G's
        optimizer afresh, as the tutorial's new Adam does."""
        self.nets.opt_G.state.clear()  # Accelerate's wrapper forwards `state`

    def __call__(self, L: torch.Tensor, ab: torch.Tensor, stop: bool | None = None,
                 warmup: bool = False) -> StepResult:
        """One iteration (`warmup`: an L1 warm-up update of G alone). `stop` is this rank's stop
        request; passing it (True or False) makes this a host-read step: the skipped-step count
        and the stop request of every rank are read with one synchronisation (and one small
        all-reduce). Every rank must pass it at the same steps. With `stop=None` and fused Adam
        the step never waits for the device."""
        L = L.contiguous(memory_format=self.nets.memory_format)
        ab = ab.contiguous(memory_format=self.nets.memory_format)
        losses, ok = self._l1_step(L, ab) if warmup else self._gan_step(L, ab)
        self._skipped += (~ok).long()
        result = StepResult({k: v.detach() for k, v in losses.items()}, ok, skipped=None)
        if stop is not None:
            result.skipped, result.stop = self._read(stop)
        return result

    def _l1_step(self, L: torch.Tensor, ab: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The warm-up: G alone, plain L1 (the tutorial's nn.L1Loss); D is not called."""
        with self.accelerator.autocast():
            fake_ab = self.nets.G(L)
        loss = l1_loss(fake_ab, ab)
        self.accelerator.backward(loss)
        bad = self._any_rank_nonfinite(loss)
        self._update(self.nets.opt_G, bad)
        return {"loss/G_L1": loss}, bad == 0

    def _gan_step(self, L: torch.Tensor, ab: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        acc, n, mode = self.accelerator, self.nets, self.optim.gan_mode
        with acc.autocast():
            fake_ab = n.G(L)
            pred_real, pred_fake = self._discriminate(L, ab, fake_ab.detach())
        loss_D_real, loss_D_fake = d_loss(mode, pred_real, pred_fake)
        loss_D = 0.5 * (loss_D_real + loss_D_fake)
        # Backward even when the loss is not finite: every rank must join the same gradient
        # all-reduce; the update is then skipped on all ranks together.
        acc.backward(loss_D)
        d_bad = self._any_rank_nonfinite(loss_D)
        self._update(n.opt_D, d_bad)

        n.D_raw.requires_grad_(False)
        with acc.autocast():
            pred = n.D_local(torch.cat([L, fake_ab], dim=1))
        loss_G_GAN = g_gan_loss(mode, pred)
        loss_G_L1 = l1_loss(fake_ab, ab)
        acc.backward(loss_G_GAN + self.optim.lambda_l1 * loss_G_L1)
        n.D_raw.requires_grad_(True)
        g_bad = self._any_rank_nonfinite(loss_G_GAN + loss_G_L1)
        self._update(n.opt_G, g_bad)

        losses = {"loss/D_real": loss_D_real, "loss/D_fake": loss_D_fake,
                  "loss/G_GAN": loss_G_GAN, "loss/G_L1": loss_G_L1}
        return losses, (d_bad + g_bad) == 0

    def _discriminate(self, L: torch.Tensor, ab: torch.Tensor,
                      fake_ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D's logits on (real, fake) pairs: two forwards (fake first, as the reference), or one
        over both (`d_concat`: BatchNorm then normalises real and fake together)."""
        D = self.nets.D
        if self.d_concat:
            pred = D(torch.cat([torch.cat([L, fake_ab], 1), torch.cat([L, ab], 1)], 0))
            pred_fake, pred_real = pred.chunk(2)
            return pred_real, pred_fake
        pred_fake = D(torch.cat([L, fake_ab], dim=1))
        return D(torch.cat([L, ab], dim=1)), pred_fake

    def _any_rank_nonfinite(self, loss: torch.Tensor) -> torch.Tensor:
        """1.0 (float, on the device) when `loss` is not finite on some rank, else 0.0."""
        bad = self.accelerator.reduce((~torch.isfinite(loss.detach())).float(), reduction="sum")
        return (bad > 0).float()

    def _update(self, opt: torch.optim.Optimizer, bad: torch.Tensor) -> None:
        if self.skip_on_device:
            inner = getattr(opt, "optimizer", opt)  # Accelerate's wrapper forwards step()
            inner.found_inf = bad  # read by fused Adam's step, as a GradScaler sets it
            opt.step()
            del inner.found_inf
        elif not bad.item():  # host sync: plain Adam has no on-device skip
            opt.step()
        opt.zero_grad(set_to_none=True)

    def _read(self, stop: bool) -> tuple[int, bool]:
        """(skipped steps since the last read, any rank asked to stop): the one host read."""
        stop_any = self.accelerator.reduce(torch.tensor(float(stop), device=self._skipped.device),
                                           reduction="sum")
        skipped, stop_count = torch.stack([self._skipped.float(), stop_any]).tolist()
        self._skipped.zero_()
        return int(skipped), stop_count > 0
