"""The tutorial recipe's first two steps on a fixed global batch of 16, split over however many
processes run this (tests/test_recipes.py: 1 process in the test itself, 2 gloo processes under
torchrun). Each rank saves the gradients of the first step and the state after the second, for
model.norm=batch (statistics over the global batch) and batch_local (per process)."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from pix2pix_dist.config import build_config
from pix2pix_dist.gan_step import GanStep, Networks, build_networks

GLOBAL_BATCH, SIZE = 16, 256


def tutorial_config(norm: str):
    # The tutorial's networks (unet_256 + 70x70 PatchGAN, BatchNorm, 256x256), narrower so two CPU
    # processes run them in seconds; dropout off, as its noise cannot be drawn identically for
    # 1 x 16 and 2 x 8 images.
    return build_config("tutorial", overrides=[
        ("model.norm", norm), ("model.ngf", 4), ("model.ndf", 4), ("model.dropout", False),
        ("train.mixed_precision", "no")])


def global_batches(steps: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        L = torch.rand(GLOBAL_BATCH, 1, SIZE, SIZE, generator=gen, dtype=torch.float64) * 2 - 1
        ab = (torch.rand(GLOBAL_BATCH, 2, SIZE, SIZE, generator=gen, dtype=torch.float64) - 0.5) * 0.6
        # The second half is darker and more saturated: per-process statistics then differ
        # clearly from the global batch's.
        L[GLOBAL_BATCH // 2:] = L[GLOBAL_BATCH // 2:] * 0.5 - 0.4
        ab[GLOBAL_BATCH // 2:] *= 1.5
        batches.append((L, ab))
    return batches


def _named_grads(nets: Networks, net: str) -> dict[str, torch.Tensor]:
    module = nets.G_raw if net == "G" else nets.D_raw
    return {f"{net}.{k}": p.grad.detach().clone() for k, p in module.named_parameters()}


def two_steps(accelerator: Accelerator, norm: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"init": state, "grads": first step's G and D gradients, "state": state after 2 steps}.

    In float64: in float32, rounding alone (the same 16 images in another order on one
    process) moves the first gradients by up to 1.4e-5 and the 2-step update of some tensors by
    0.5% (measured), which would hide what the test compares."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _two_steps(accelerator, norm)
    finally:
        torch.set_default_dtype(default)


def _two_steps(accelerator: Accelerator, norm: str) -> dict[str, dict[str, torch.Tensor]]:
    rank, world = accelerator.process_index, accelerator.num_processes
    per = GLOBAL_BATCH // world
    cfg = tutorial_config(norm)
    torch.manual_seed(0)
    nets = build_networks(cfg, accelerator)
    step = GanStep(accelerator, nets, cfg.optim)
    first: dict[str, dict[str, torch.Tensor]] = {}  # per network: its first update's gradients
    hooks = [getattr(opt, "optimizer", opt).register_step_pre_hook(
        lambda *_, net=net: None if net in first else first.update({net: _named_grads(nets, net)}))
        for opt, net in ((nets.opt_G, "G"), (nets.opt_D, "D"))]

    def state() -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().clone()
                for name, net in (("G", nets.G_raw), ("D", nets.D_raw))
                for k, v in net.state_dict().items()}

    init = state()
    for L, ab in global_batches():
        step(L[rank * per:(rank + 1) * per], ab[rank * per:(rank + 1) * per])
    for hook in hooks:
        hook.remove()
    grads = first["G"] | first["D"]
    return {"init": init, "grads": grads, "state": state()}


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    view = {"world": accelerator.num_processes}
    for norm in ("batch", "batch_local"):
        view[norm] = two_steps(accelerator, norm)
    torch.save(view, out / f"rank{accelerator.process_index}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
