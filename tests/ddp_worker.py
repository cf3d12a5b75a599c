"""One DDP worker for the multi-process tests: train, then dump this rank's view.

Started by `accelerate launch --multi_gpu --num_processes 2` (gloo on a machine without CUDA):
    ddp_worker.py OUT [key=value ...]      train, then write OUT/rank{R}.json and OUT/rank{R}.pt
    ddp_worker.py --fail RANK:STEP [key=value ...]
                                           run train.py's main(), with rank RANK's input stream
                                           raising the DataError a damaged shard raises at STEP
    ddp_worker.py --nan-after STEP [key=value ...]
                                           run train.py's main(), with a NaN written into one
                                           generator weight after STEP's update (as a diverging
                                           run would leave it)
    ddp_worker.py --sigterm-after STEP [key=value ...]
                                           run train.py's main(), sending this process SIGTERM
                                           right after STEP's update (a deterministic stop point;
                                           also for single-process runs)
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from pix2pix_dist import train_loop
from pix2pix_dist.config import parse_command
from pix2pix_dist.data import DataError, build_loader
from pix2pix_dist.data.shards_index import find_shards
from pix2pix_dist.recipe import resolve_recipe
from pix2pix_dist.train_loop import train


class FailingLoader:
    """A real loader whose stream breaks after `fail_at` batches, as a truncated shard does."""

    def __init__(self, loader, fail_at: int) -> None:
        self._loader, self._fail_at, self._served = loader, fail_at, 0

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        for batch in self._loader:
            self._served += 1  # over all epochs
            if self._served >= self._fail_at:
                raise DataError("shard train-000001.tar is truncated at byte 4096 (injected)")
            yield batch


def run_failing(spec: str, argv: list[str]) -> int:
    fail_rank, fail_step = (int(x) for x in spec.split(":"))

    def build(shards, data, *, rank, **kwargs):
        loader = build_loader(shards, data, rank=rank, **kwargs)
        return FailingLoader(loader, fail_step) if shards.split == "train" and rank == fail_rank else loader

    train_loop.build_loader = build
    return train_loop.main(argv)


def run_with_fault(after: int, fault, argv: list[str]) -> int:
    """train.py's main() with `fault(step)` called right after the `after`-th update."""
    class FaultyStep(train_loop.GanStep):
        steps = 0

        def __call__(self, *args, **kwargs):
            result = super().__call__(*args, **kwargs)
            FaultyStep.steps += 1
            if FaultyStep.steps == after:
                fault(self)
            return result

    train_loop.GanStep = FaultyStep
    return train_loop.main(argv)


def write_nan(step) -> None:
    with torch.no_grad():
        next(step.nets.G_raw.parameters()).view(-1)[0] = float("nan")


def send_sigterm(step) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's own stop_signals


def main() -> None:
    if sys.argv[1] == "--fail":
        sys.exit(run_failing(sys.argv[2], sys.argv[3:]))
    if sys.argv[1] == "--nan-after":
        sys.exit(run_with_fault(int(sys.argv[2]), write_nan, sys.argv[3:]))
    if sys.argv[1] == "--sigterm-after":
        sys.exit(run_with_fault(int(sys.argv[2]), send_sigterm, sys.argv[3:]))
    out = Path(sys.argv[1])
    cfg = parse_command(sys.argv[2:])[0]
    result = train(cfg)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    shards = find_shards(cfg.data.shards, "train")
    loader = build_loader(shards, cfg.data,
                          batch_size=resolve_recipe(cfg, world, shards.total).batch_per_process,
                          rank=rank, world_size=world, device=torch.device("cpu"), seed=cfg.train.seed)
    loader.set_epoch(0)
    sums = [float(L.double().sum() + ab.double().sum()) for L, ab in loader]
    torch.save({"G": result.generator.state_dict(), "D": result.discriminator.state_dict()},
               out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"world": world, "step": result.step, "batches": len(loader), "batch_sums": sums}))


if __name__ == "__main__":
    main()
