"""Benchmark options, declared once: the dataclass below is the command line (pix2pix_dist/cli.py
derives it), and `resolve` fills the device-dependent defaults and checks the ranges."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from ..cli import Maybe
from ..device_defaults import device_type
from ..errors import BenchError


@dataclass
class BenchSettings:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to measure: `auto` is CUDA when a GPU is visible, else the CPU."""
    shards: Maybe[str] = None
    """Existing shards folder (e.g. shards/coco) instead of the synthetic COCO-like set."""
    synthetic: Maybe[int] = None
    """Synthetic 640x480 JPEGs to build (default: 2048 on CUDA, 96 on CPU)."""
    cache: str = "shards/bench-640x480"
    """Folder of the synthetic shards, reused while it holds the same set."""
    batch_size: Maybe[int] = None
    """Input-pipeline batch (default: 256 on CUDA, 8 on CPU)."""
    train_batch_size: Maybe[int] = None
    """Batch of the reference step and of ours beside it (default: 16 on CUDA, 2 on CPU)."""
    processes: int = 1
    """Processes per training point, launched by torchrun (one GPU each on CUDA, NCCL; gloo on
    a CPU, with one compute thread each unless OMP_NUM_THREADS is set); batches are per
    process and img/s count every process's images. Above 1 the training table gets ours twice
    at --train-batch-size: model.norm=batch (statistics over all processes' images) and
    batch_local (each process's own), in the same interleaved rounds, and their ratio; the
    reference keeps plain BatchNorm per process, as pix2pix under DDP. Default 1 on every device
    (the table the speed targets are defined for: one GPU); all GPUs: --processes
    $(nvidia-smi -L | wc -l)."""
    batch_sweep: Maybe[str] = None
    """Further batches for our step, comma-separated, e.g. 64,128,256 (default: 64,128,256 on
    CUDA, 1,4 on CPU); the fastest point is reported as ours at its best batch."""
    repeats: Maybe[int] = None
    """Rounds of the reference and ours at the same batch (with --processes above 1, ours with
    both norms), and of the input pipelines at --workers, interleaved so that a load change on a
    busy machine hits both sides; figures are medians over the rounds, with min-max (default: 3
    on CPU, 2 on CUDA)."""
    worker_counts: Maybe[str] = None
    """Loader worker/thread counts of the scaling curve, comma-separated (default: 1, 2, 4, ...
    up to the CPU cores, and --workers)."""
    colorize_megapixels: Maybe[str] = None
    """Photo sizes in megapixels for the colorize cost curve, comma-separated; empty: skip it
    (default: 0.3,1,4 on CPU, 1,4,16 on CUDA)."""
    crop: Maybe[int] = None
    """Training crop (default: 256 on CUDA, 128 on CPU)."""
    load_size: Maybe[int] = None
    """Shorter side our loaders resize to before cropping (default: crop * 286 / 256)."""
    num_downs: Maybe[int] = None
    """Generator depth: 8 is unet_256 (default on CUDA), 7 is unet_128 (default on CPU)."""
    ngf: int = 64
    """Generator filters in the first layer (pix2pix: 64; smaller only for quick tries)."""
    ndf: int = 64
    """Discriminator filters in the first layer (pix2pix: 64)."""
    workers: int = os.cpu_count() or 1
    """DALI threads / DataLoader workers of every loader (the same for a fair ratio)."""
    seconds: Maybe[float] = None
    """Timed seconds per input-pipeline measurement (default: 20 on CUDA, 3 on CPU)."""
    max_iters: Maybe[int] = None
    """Cap on the timed batches of an input-pipeline measurement."""
    warmup: Maybe[int] = None
    """Warm-up batches of the input pipelines, and untimed first training steps (torch.compile
    and cuDNN autotuning happen there). Default: 20 on CUDA, 2 on CPU."""
    steps: Maybe[int] = None
    """Timed training steps per training point, after the warm-up (default: 100 on CUDA, 8 on CPU)."""
    only: Maybe[Literal["data", "train", "colorize"]] = None
    """Measure only the input pipelines (`data`), the training points (`train`) or colorize's
    cost curve (`colorize`)."""
    compile: bool = False
    """Our step under torch.compile (the reference always runs eager)."""
    resnet: bool = True
    """Also train ours with the resnet18-unet generator (fresh encoder weights) at
    --train-batch-size, once: its img/s, FLOPs and parameters beside the U-Net's."""
    point_timeout: float = 1800.0
    """Seconds one training point may take (start-up and compilation included)."""
    output: str = "benchmarks/results"
    """Folder for the results files (<date>-<device>.json and .md)."""
    seed: int = 0
    """Seed of the synthetic set, the weights and the data order."""

    def sweep(self) -> list[int]:
        """The batches of our step: the reference's, then the sweep's, without repeats."""
        assert self.train_batch_size is not None and self.batch_sweep is not None
        extra = [int(b) for b in self.batch_sweep.split(",") if b.strip()]
        return list(dict.fromkeys([self.train_batch_size, *extra]))

    def worker_sweep(self) -> list[int]:
        """The loader worker counts of the scaling curve, ascending, --workers included."""
        assert self.worker_counts is not None
        return sorted({int(w) for w in self.worker_counts.split(",") if w.strip()} | {self.workers})

    def megapixels(self) -> list[float]:
        """The photo sizes of the colorize cost curve (empty: not measured)."""
        assert self.colorize_megapixels is not None
        return [float(mp) for mp in self.colorize_megapixels.split(",") if mp.strip()]

    @property
    def log_every(self) -> int:
        """Training points log every this many steps: whole log intervals are warm-up or timed."""
        assert self.warmup is not None and self.steps is not None
        return math.gcd(self.warmup, self.steps)


def resolve(s: BenchSettings) -> BenchSettings:
    """`s` with the device-dependent defaults filled in and every range checked (BenchError)."""
    device = s.device
    if device == "auto":
        device = device_type()
    elif device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    gpu = device == "cuda"

    def pick(value, on_gpu, on_cpu):
        return value if value is not None else (on_gpu if gpu else on_cpu)

    crop = pick(s.crop, 256, 128)
    r = dataclasses.replace(
        s, device=device, synthetic=pick(s.synthetic, 2048, 96),
        batch_size=pick(s.batch_size, 256, 8), train_batch_size=pick(s.train_batch_size, 16, 2),
        batch_sweep=pick(s.batch_sweep, "64,128,256", "1,4"), crop=crop,
        load_size=s.load_size if s.load_size is not None else round(crop * 286 / 256),
        num_downs=pick(s.num_downs, 8, 7), seconds=pick(s.seconds, 20.0, 3.0),
        warmup=pick(s.warmup, 20, 2), steps=pick(s.steps, 100, 8),
        repeats=pick(s.repeats, 2, 3),
        worker_counts=s.worker_counts if s.worker_counts is not None else ",".join(
            str(2 ** i) for i in range(max(1, os.cpu_count() or 1).bit_length())),
        colorize_megapixels=pick(s.colorize_megapixels, "1,4,16", "0.3,1,4"))
    _validate(r)
    return r


def _validate(s: BenchSettings) -> None:
    for name in ("synthetic", "batch_size", "train_batch_size", "crop", "ngf", "ndf", "workers",
                 "warmup", "steps"):
        if getattr(s, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    try:
        batches = s.sweep()
    except ValueError:
        raise BenchError(f"--batch-sweep {s.batch_sweep!r}: expected batch sizes separated by "
                         f"commas, e.g. 64,128,256") from None
    if min(batches) < 1:
        raise BenchError(f"--batch-sweep {s.batch_sweep!r}: batch sizes must be at least 1")
    if s.processes < 1:
        raise BenchError(f"--processes must be at least 1, got {s.processes}")
    if s.device == "cuda" and s.processes > torch.cuda.device_count():
        raise BenchError(f"--processes {s.processes}: only {torch.cuda.device_count()} GPU(s) "
                         f"are visible (one process per GPU)")
    if s.repeats < 1:
        raise BenchError(f"--repeats must be at least 1, got {s.repeats}")
    try:
        workers, megapixels = s.worker_sweep(), s.megapixels()
    except ValueError:
        raise BenchError("--worker-counts and --colorize-megapixels take numbers separated by "
                         "commas, e.g. 1,2,4 and 0.3,1,4") from None
    if min(workers) < 1:
        raise BenchError(f"--worker-counts {s.worker_counts!r}: counts must be at least 1")
    if any(not (math.isfinite(mp) and 0.01 <= mp <= 100) for mp in megapixels):
        raise BenchError(f"--colorize-megapixels {s.colorize_megapixels!r}: sizes must be "
                         f"between 0.01 and 100")
    if not (math.isfinite(s.seconds) and s.seconds > 0) or (s.max_iters is not None and s.max_iters < 1):
        raise BenchError("--seconds must be positive and finite, --max-iters at least 1")
    if not (math.isfinite(s.point_timeout) and s.point_timeout > 0):
        raise BenchError(f"--point-timeout must be positive, got {s.point_timeout}")
    if s.num_downs < 5:
        raise BenchError(f"--num-downs must be at least 5, got {s.num_downs}")
    if s.crop % 2 ** s.num_downs:
        raise BenchError(f"--crop {s.crop} must be divisible by 2**num_downs = {2 ** s.num_downs} "
                         f"(256 with --num-downs 8, 128 with 7, 64 with 6)")
    if s.load_size < s.crop:
        raise BenchError(f"--load-size {s.load_size} must be at least --crop {s.crop}")
