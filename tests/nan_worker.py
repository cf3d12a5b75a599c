"""train.py with the generator's first weights set to NaN after they are built: a deterministic
source of non-finite losses for tests (config values that would produce them, such as
optim.lr=1e38, are refused by Config.validate)."""

import sys

import torch

from pix2pix_dist import train_loop
from pix2pix_dist.gan_step import build_networks


def poisoned_networks(cfg, accelerator):
    nets = build_networks(cfg, accelerator)
    with torch.no_grad():
        next(nets.G_raw.parameters()).fill_(float("nan"))
    return nets


if __name__ == "__main__":
    train_loop.build_networks = poisoned_networks
    sys.exit(train_loop.main(sys.argv[1:]))
