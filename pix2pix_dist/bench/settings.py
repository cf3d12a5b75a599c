"""Benchmark settings: the command line, its device-dependent defaults and their validation."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from .errors import BenchError


@dataclass
class BenchSettings:
    device: str
    """`cuda` or `cpu` (resolved from --device auto)."""
    shards: str | None
    """Existing shards to read, or None for the synthetic COCO-like set."""
    synthetic: int
    """Images in the synthetic set (640x480 JPEG q90)."""
    cache: str
    """Folder of the synthetic shards (reused when it holds the same set)."""
    batch_size: int
    """Images per batch for the input-pipeline measurements."""
    train_batch_size: int
    """Images per training step."""
    crop: int
    """Training crop (and the tutorial loader's square resize)."""
    load_size: int
    """Shorter side our loaders resize to before cropping (pix2pix: 286 for a 256 crop)."""
    num_downs: int
    """Generator depth: 8 is unet_256, 7 is unet_128."""
    workers: int
    """DALI CPU threads / DataLoader workers for every loader (the same for a fair ratio)."""
    seconds: float
    """Timed seconds per measurement (after warm-up)."""
    warmup: int
    """Warm-up batches/steps excluded from the timing."""
    max_iters: int | None
    """Stop a measurement after this many timed batches/steps even before `seconds`."""
    only: str | None
    """`data`, `train`, or None for both."""
    compile: bool
    """Also measure the training step under torch.compile."""
    output: str
    """Folder for the results files."""
    seed: int


def parse_args(argv: list[str]) -> BenchSettings:
    """Command line -> settings, with defaults that depend on the device (small on CPU)."""
    p = argparse.ArgumentParser(
        prog="python -m pix2pix_dist.bench",
        description="Input pipeline (DALI vs torch fallback vs tutorial loader) and training "
                    "step throughput. Defaults are sized for one H100 on CUDA and for a few "
                    "minutes on a small CPU machine otherwise.")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--shards", help="existing shards folder (e.g. shards/coco) instead of the "
                                    "synthetic COCO-like set")
    p.add_argument("--synthetic", type=int, metavar="N",
                   help="synthetic 640x480 JPEGs to build (default: 2048 on CUDA, 96 on CPU)")
    p.add_argument("--cache", default="shards/bench-640x480",
                   help="folder of the synthetic shards, reused when it holds the same set")
    p.add_argument("--batch-size", type=int, help="input-pipeline batch (default 256 CUDA / 8 CPU)")
    p.add_argument("--train-batch-size", type=int, help="training batch (default 64 CUDA / 2 CPU)")
    p.add_argument("--crop", type=int, help="training crop (default 256 CUDA / 128 CPU)")
    p.add_argument("--load-size", type=int, help="resize before crop (default crop*286/256)")
    p.add_argument("--num-downs", type=int, help="generator depth (default 8 CUDA / 7 CPU)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="DALI threads / DataLoader workers of every loader (default: all cores)")
    p.add_argument("--seconds", type=float, help="timed seconds per measurement (20 CUDA / 4 CPU)")
    p.add_argument("--warmup", type=int, help="warm-up batches/steps, not timed (5 CUDA / 2 CPU)")
    p.add_argument("--max-iters", type=int, help="cap on timed batches/steps per measurement")
    p.add_argument("--only", choices=("data", "train"))
    p.add_argument("--compile", action="store_true", help="also time the step with torch.compile")
    p.add_argument("--output", default="bench_results", help="results folder")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif a.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    gpu = a.device == "cuda"

    def pick(value, on_gpu, on_cpu):
        return value if value is not None else (on_gpu if gpu else on_cpu)

    crop = pick(a.crop, 256, 128)
    s = BenchSettings(
        device=a.device, shards=a.shards, synthetic=pick(a.synthetic, 2048, 96), cache=a.cache,
        batch_size=pick(a.batch_size, 256, 8), train_batch_size=pick(a.train_batch_size, 64, 2),
        crop=crop, load_size=a.load_size if a.load_size is not None else round(crop * 286 / 256),
        num_downs=pick(a.num_downs, 8, 7), workers=a.workers,
        seconds=pick(a.seconds, 20.0, 4.0), warmup=pick(a.warmup, 5, 2),
        max_iters=a.max_iters, only=a.only, compile=a.compile, output=a.output, seed=a.seed)
    _validate(s)
    return s


def _validate(s: BenchSettings) -> None:
    for name in ("synthetic", "batch_size", "train_batch_size", "crop", "workers"):
        if getattr(s, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.seconds <= 0 or s.warmup < 0 or (s.max_iters is not None and s.max_iters < 1):
        raise BenchError("--seconds must be positive, --warmup >= 0 and --max-iters >= 1")
    if s.num_downs < 5:
        raise BenchError(f"--num-downs must be at least 5, got {s.num_downs}")
    if s.crop % 2 ** s.num_downs:
        raise BenchError(f"--crop {s.crop} must be divisible by 2**num_downs = {2 ** s.num_downs} "
                         f"(256 with --num-downs 8, 128 with 7, 64 with 6)")
    if s.load_size < s.crop:
        raise BenchError(f"--load-size {s.load_size} must be at least --crop {s.crop}")
