"""The measurements: input pipelines (DALI, torch fallback, tutorial) and the training step."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import BenchError
from .settings import BenchSettings
from .timing import Timing, time_iterations
from .tutorial_loader import tutorial_batches

if TYPE_CHECKING:
    from ..data.shards_index import ShardSet


# One pix2pix training step (unet_256, ngf 64, 70x70 PatchGAN, G forward + D on fake and real +
# G step backward) costs about 86.0 GFLOP per 256x256 image (see ARCHITECTURE.md). Other crops
# scale it by area; other depths (num_downs) change it only slightly (the inner levels are tiny).
GFLOP_PER_IMAGE_256 = 86.0
LOADERS = ("dali", "torch", "tutorial")


def train_shards(shards: Path) -> ShardSet:
    """The train split of a shards folder, as the loaders see it (a ShardSet), or one clear error."""
    from ..data import DataError
    from ..data.shards_index import find_shards

    if not shards.is_dir():
        raise BenchError(f"--shards {shards}: no such folder")
    try:
        return find_shards(shards, "train")
    except DataError as exc:
        raise BenchError(f"--shards {shards}: {exc}") from None


# Input pipelines

def _endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _measure_stream(stream: Iterator[tuple[torch.Tensor, torch.Tensor]], s: BenchSettings,
                    device: torch.device, quantum: int) -> Timing:
    def step() -> int:
        L, ab = next(stream)
        return int(L.shape[0])
    return time_iterations(step, device=device, seconds=s.seconds, warmup=s.warmup,
                           max_iters=s.max_iters, quantum=quantum)


def measure_input_pipelines(s: BenchSettings, shards: Path, device: torch.device) -> dict[str, Any]:
    """img/s of the DALI loader, the torch fallback and the tutorial loader on `shards`."""
    from ..config import DataConfig
    from ..data import DataError, build_loader

    split = train_shards(shards)
    tars, images = [shard.tar for shard in split.shards], split.total
    results: dict[str, Any] = {}
    for name in LOADERS:
        print(f"measuring input pipeline: {name} ...", flush=True)
        entry: dict[str, Any] = {"batch_size": s.batch_size, "workers": s.workers}
        try:
            if name == "tutorial":
                min_samples = s.batch_size * s.workers * 64  # never reach an epoch boundary
                stream = tutorial_batches(tars, batch_size=s.batch_size, size=s.crop,
                                          workers=s.workers, device=device, min_samples=min_samples)
                entry["pipeline"] = (f"PIL + Resize(({s.crop},{s.crop}), BICUBIC) + flip + "
                                     f"skimage rgb2lab, DataLoader({s.workers} workers)")
                quantum = s.workers
            else:
                cfg = DataConfig(shards=str(shards), backend=name, batch_size=s.batch_size,
                                 load_size=s.load_size, crop_size=s.crop, num_threads=s.workers,
                                 shuffle_buffer=max(1, min(DataConfig.shuffle_buffer, images)))
                loader = build_loader(cfg, "train", rank=0, world_size=1, device=device,
                                      seed=s.seed)
                entry.update(backend=loader.backend, batches_per_epoch=len(loader),
                             pipeline=f"resize {s.load_size} + crop {s.crop} + flip + Lab")
                stream = _endless(loader)
                # DALI threads and the torch fallback's per-sample worker stream deliver batches
                # smoothly; only the tutorial's per-batch workers arrive in bursts.
                quantum = 1
            timing = _measure_stream(stream, s, device, quantum)
            entry.update(images_per_s=timing.per_second, batches=timing.iterations,
                         images=timing.items, seconds=timing.seconds,
                         first_batch_s=timing.first_s)
        except BenchError:
            raise
        except Exception as exc:  # noqa: BLE001 -- e.g. DALI missing: report it, measure the rest
            entry["error"] = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            print(f"  {name}: skipped: {entry['error']}", flush=True)
        finally:
            stream = loader = None  # noqa: F841 -- stop workers before the next loader starts
            gc.collect()
        results[name] = entry
    return {"shards": str(shards), "images": images, "tars": len(tars), "loaders": results}


# Training step

def gflop_per_image(crop: int) -> float:
    """The unet_256 step cost (86.0 GFLOP at 256x256) scaled by image area."""
    return GFLOP_PER_IMAGE_256 * (crop / 256) ** 2


class TrainStep:
    """A callable training iteration that returns the images it used; keeps the last G loss."""

    def __init__(self, fn: Callable[[], torch.Tensor], images: int) -> None:
        self.fn, self.images, self.last_loss = fn, images, None

    def __call__(self) -> int:
        self.last_loss = self.fn()
        return self.images


def make_train_step(s: BenchSettings, device: torch.device, compiled: bool) -> TrainStep:
    """The training loop's own step (gan_step.GanStep, including its finite-loss checks) on a
    fixed synthetic batch: unet with ngf 64, 70x70 PatchGAN, Adam, bf16 autocast and
    channels_last on CUDA, fp32 on CPU."""
    from accelerate import Accelerator

    from ..config import Config
    from ..gan_step import GanStep, build_networks

    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    cfg = Config()
    cfg.model.num_downs, cfg.train.compile = s.num_downs, compiled
    cfg.train.mixed_precision = "bf16" if cuda else "no"
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not cuda)
    nets = build_networks(cfg, accelerator)
    step_fn = GanStep(accelerator, nets, cfg.optim)

    gen = torch.Generator(device=device).manual_seed(s.seed)
    shape = (s.train_batch_size, 1, s.crop, s.crop)
    L = torch.rand(shape, device=device, generator=gen) * 2 - 1
    ab = torch.rand((shape[0], 2, *shape[2:]), device=device, generator=gen) - 0.5

    def step() -> torch.Tensor:
        result = step_fn(L, ab)
        return result.loss_G_GAN + cfg.optim.lambda_l1 * result.loss_G_L1

    return TrainStep(step, s.train_batch_size)


def measure_training(s: BenchSettings, device: torch.device, compiled: bool) -> dict[str, Any]:
    """img/s, ms/step, TFLOP/s and peak memory of the training step."""
    print(f"measuring training step: {'compiled' if compiled else 'eager'} ...", flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_train_step(s, device, compiled)
    # torch.compile compiles during the first step(s): they are warm-up, reported apart.
    timing = time_iterations(step, device=device, seconds=s.seconds, warmup=s.warmup,
                             max_iters=s.max_iters)
    loss = float(step.last_loss)
    if not math.isfinite(loss):
        raise BenchError(f"training step produced a non-finite loss ({loss})")
    ips = timing.per_second
    gflop = gflop_per_image(s.crop)
    result = {
        "images_per_s": ips, "ms_per_step": 1000 * timing.seconds / timing.iterations,
        "steps": timing.iterations, "seconds": timing.seconds, "first_step_s": timing.first_s,
        "gflop_per_image": gflop, "tflop_per_s": ips * gflop / 1000,
        "peak_gpu_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                             if device.type == "cuda" else None),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "batch_size": s.train_batch_size, "crop": s.crop, "num_downs": s.num_downs,
    }
    del step
    gc.collect()
    return result
