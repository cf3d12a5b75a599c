"""train.py with NaN colour targets in every training batch: a deterministic source of
non-finite losses for tests (config values that would produce them, such as optim.lr=1e38, are
refused by Config.validate). The targets, not the weights, are poisoned: the update is skipped
and the weights stay finite, which is the case skipping is for (NaN weights stop the run at
once; tests/ddp_worker.py --nan-after covers that)."""

import sys

import torch

from pix2pix_dist import train_loop
from pix2pix_dist.data import build_loader


class NanTargets:
    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        for L, ab in self._loader:
            yield L, torch.full_like(ab, float("nan"))


def poisoned_loader(shards, data, **kwargs):
    loader = build_loader(shards, data, **kwargs)
    return NanTargets(loader) if shards.split == "train" else loader


if __name__ == "__main__":
    train_loop.build_loader = poisoned_loader
    sys.exit(train_loop.main(sys.argv[1:]))
