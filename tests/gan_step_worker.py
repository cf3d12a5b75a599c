"""One rank of tests/test_gan_step.py's gloo test (started by torchrun, 2 processes): three
steps on this rank's own data, rank 1's second batch holding a NaN, rank 0 asking to stop at the
second step; saves the parameters after each step and what the step reported."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from pix2pix_dist.gan_step import GanStep, build_networks
from test_gan_step import batch, tiny_config


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = tiny_config(fused_adam=True)
    cfg.model.norm = "instance"  # parameters only: no per-rank running statistics to compare
    set_seed(0)
    nets = build_networks(cfg, accelerator)
    step = GanStep(accelerator, nets, cfg.optim)
    set_seed(1, device_specific=True)
    view = {"world": world, "skipped": [], "stop": [], "params": []}
    for i in range(3):
        L, ab = batch(10 * i + rank)
        if i == 1 and rank == 1:
            ab[0, 1, 2, 3] = float("nan")
        result = step(L, ab, stop=(i == 1 and rank == 0))
        view["skipped"].append(result.skipped)
        view["stop"].append(result.stop)
        view["params"].append({k: v.detach().clone() for k, v in nets.G_raw.state_dict().items()}
                              | {f"D.{k}": v.detach().clone()
                                 for k, v in nets.D_raw.state_dict().items()})
    torch.save(view, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
