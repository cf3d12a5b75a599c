"""The speed settings that are fastest on each kind of device, as measured: one definition, used
by the training loop (train.py) and by the benchmark's "ours", so the benchmark times what a
user's run does. The measurements behind each choice: docs/design.md, "Per-device defaults".

Only `auto` values are replaced; an explicit value runs as given on any device (bf16 autocast
and channels_last also run on a CPU, which is how CI exercises the GPU recipe's paths).
"""

from __future__ import annotations

import dataclasses

import torch

from .config import Config, TrainConfig


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where oneDNN's bf16
    convolutions beat fp32; elsewhere bf16 is emulated and slower."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def device_type() -> str:
    """The device train.py runs on: `cuda` when a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_train(train: TrainConfig, device: str) -> TrainConfig:
    """`train` with `auto` replaced by the fastest measured setting on `device` (`cuda`/`cpu`).

    - mixed_precision: bf16 on CUDA (tensor cores) and on CPUs with native bf16 (1.5x over fp32
      on an AVX512-BF16 Xeon); fp32 on other CPUs.
    - channels_last: on CUDA (cuDNN's NHWC kernels); off on a CPU (oneDNN's NHWC convolutions
      and transposed convolutions measured 0.7x of NCHW).
    The other speed options have one default for every device (train.fused_adam on,
    train.sync_every 1, train.compile off): docs/design.md says why."""
    gpu = device == "cuda"
    precision = train.mixed_precision
    if precision == "auto":
        precision = "bf16" if gpu or cpu_has_native_bf16() else "no"
    channels_last = gpu if train.channels_last is None else train.channels_last
    return dataclasses.replace(train, mixed_precision=precision, channels_last=channels_last)


def resolve(cfg: Config, device: str | None = None) -> Config:
    """`cfg` with its train settings resolved for `device` (default: this machine's)."""
    return dataclasses.replace(cfg, train=resolve_train(cfg.train, device or device_type()))
