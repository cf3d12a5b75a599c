"""One DDP worker for tests/test_training.py: train, then dump this rank's view.

Started by `accelerate launch --multi_gpu --num_processes 2` (gloo on a machine without CUDA)."""

import json
import sys
from pathlib import Path

import torch

from pix2pix_dist.config import parse_args
from pix2pix_dist.data import build_loader
from pix2pix_dist.train_loop import train


def main() -> None:
    out = Path(sys.argv[1])
    cfg = parse_args(sys.argv[2:])
    result = train(cfg)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    loader = build_loader(cfg.data, "train", rank=rank, world_size=world,
                          device=torch.device("cpu"), seed=cfg.train.seed)
    loader.set_epoch(0)
    sums = [float(L.double().sum() + ab.double().sum()) for L, ab in loader]
    torch.save({"G": result.generator.state_dict(), "D": result.discriminator.state_dict()},
               out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"world": world, "step": result.step, "batches": len(loader), "batch_sums": sums}))


if __name__ == "__main__":
    main()
