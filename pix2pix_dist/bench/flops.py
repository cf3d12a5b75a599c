"""What one training step costs in FLOPs, counted on the real step, and what the device can do.

The count comes from torch.utils.flop_counter.FlopCounterMode around one call of the training
loop's own GanStep (forward and backward of every convolution and matmul; normalisation,
activations and the optimizer are not counted, as usual for MFU). docs/design.md ("FLOPs, MFU and
what the benchmark measures") derives the count by hand: 86.0 GFLOP/image for the default
256x256 networks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's data sheets; matched against
# torch.cuda.get_device_name() in this order (the first substring that occurs wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None ("unknown") when it is not in the table."""
    name = device_name.lower()
    return next((peak for needle, peak in PEAK_BF16_TFLOPS if needle.lower() in name), None)


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs that `fn(*args, **kwargs)` executes, as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def generator_params(cfg: Config) -> int:
    """Parameters of the generator `cfg` describes (built fresh, as training builds it)."""
    from ..generators import build_generator, generator_args
    from ..models import count_parameters

    return count_parameters(build_generator(generator_args(cfg.model)))


def step_flops_per_image(cfg: Config, accelerator, crop: int, batch: int = 2) -> float:
    """FLOPs per image of one training iteration (D step + G step) of the networks `cfg`
    describes, counted eagerly on `batch` images of `crop` x `crop` (torch.compile, precision and
    memory layout change the speed, not the arithmetic)."""
    from ..gan_step import GanStep, build_networks

    eager = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False))
    nets = build_networks(eager, accelerator)
    step = GanStep(accelerator, nets, eager.optim, d_concat=eager.train.d_concat)
    gen = torch.Generator(device=accelerator.device).manual_seed(0)
    L = torch.rand((batch, 1, crop, crop), device=accelerator.device, generator=gen) * 2 - 1
    ab = torch.rand((batch, 2, crop, crop), device=accelerator.device, generator=gen) - 0.5
    return count_flops(step, L, ab) / batch
