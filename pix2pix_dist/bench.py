"""Throughput benchmark: input pipelines and the training step, in one run, as ratios.

    python -m pix2pix_dist.bench                     # COCO-like synthetic shards, no download
    python -m pix2pix_dist.bench --shards shards/coco --compile

Input pipeline (images/s, on the same shards, batches delivered on the device):
  dali      build_loader(backend="dali"): decode + resize + crop + flip + Lab ("mixed" GPU decode)
  torch     build_loader(backend="torch"): our webdataset + DataLoader fallback
  tutorial  the well-known COCO colorization tutorial's loader, reproduced here: per sample PIL
            open + RGB, Resize((S, S), BICUBIC), RandomHorizontalFlip, np.array, skimage rgb2lab,
            L/50-1, ab/110, in a DataLoader with N workers, batches moved to the device.
Training step (images/s, ms/step, TFLOP/s, peak GPU memory): the real pix2pix D step + G step on
synthetic on-device batches, eager and (with --compile) torch.compile.

Results go to stdout as a table and to bench_results/<date>-<device>.json and .md. Speed targets
live here (printed as PASS/FAIL on CUDA), never in unit tests.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__

if TYPE_CHECKING:
    from .data.shards_index import ShardSet

# One pix2pix training step (unet_256, ngf 64, 70x70 PatchGAN, G forward + D on fake and real +
# G step backward) costs about 86.0 GFLOP per 256x256 image (see ARCHITECTURE.md). Other crops
# scale it by area; other depths (num_downs) change it only slightly (the inner levels are tiny).
GFLOP_PER_IMAGE_256 = 86.0
DALI_TARGET_IMG_S = 20_000.0
"""The issue's target: DALI input pipeline on one H100 with 640x480 COCO-like JPEG shards."""
TUTORIAL_REFERENCE_IMG_S = 720.0
"""What the tutorial loader gives with 16 workers on that machine (for context only)."""
SYNTH_SIZE = (640, 480)  # COCO's most common size
SYNTH_QUALITY = 90
SYNTH_STAMP = "bench-synthetic.json"
LOADERS = ("dali", "torch", "tutorial")


class BenchError(RuntimeError):
    """Bad input for the benchmark; reported as one line."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# COCO-like data without a download
# --------------------------------------------------------------------------------------------

def source_photos() -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled colour photographs (no network needed), as HxWx3 uint8 arrays."""
    import skimage.data as data

    left, right, _ = data.stereo_motorcycle()
    photos = [("astronaut", data.astronaut()), ("chelsea", data.chelsea()),
              ("coffee", data.coffee()), ("rocket", data.rocket()),
              ("motorcycle_left", left), ("motorcycle_right", right),
              ("hubble_deep_field", data.hubble_deep_field()),
              ("ihc", data.immunohistochemistry()), ("retina", data.retina())]
    return [(name, np.ascontiguousarray(img[..., :3])) for name, img in photos]


def _synthetic_jpeg(photo: np.ndarray, rng: np.random.Generator, size: tuple[int, int],
                    quality: int) -> bytes:
    """A random 4:3 window of `photo` (40-100% of the largest one) resized to `size`, flipped at
    random, with a mild per-channel gain, encoded: real photo content, so JPEG decode
    costs what it costs on COCO, and every image differs."""
    from PIL import Image

    h, w = photo.shape[:2]
    aspect = size[0] / size[1]
    max_w = min(w, h * aspect)
    win_w = max_w * rng.uniform(0.4, 1.0)
    win_h = win_w / aspect
    x0, y0 = rng.uniform(0, w - win_w), rng.uniform(0, h - win_h)
    im = Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC,
                                       box=(x0, y0, x0 + win_w, y0 + win_h))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.9, 1.1, size=3)
    img = np.clip(np.asarray(im, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_synthetic_jpegs(out_dir: Path, n: int, *, size: tuple[int, int] = SYNTH_SIZE,
                         quality: int = SYNTH_QUALITY, seed: int = 0,
                         workers: int | None = None) -> list[Path]:
    """Write `n` distinct COCO-like JPEGs (`size`, `quality`) into `out_dir`; deterministic."""
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = source_photos()

    def one(i: int) -> bytes:
        rng = np.random.default_rng([seed, i])
        return _synthetic_jpeg(photos[i % len(photos)][1], rng, size, quality)

    # PIL releases the GIL while resizing and encoding, so threads scale.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        blobs = list(pool.map(one, range(n)))
    seen: set[str] = set()
    paths = []
    for i, blob in enumerate(blobs):
        attempt = 0
        while (digest := hashlib.sha256(blob).hexdigest()) in seen:  # astronomically rare
            attempt += 1
            rng = np.random.default_rng([seed, i, attempt])
            blob = _synthetic_jpeg(photos[i % len(photos)][1], rng, size, quality)
        seen.add(digest)
        path = out_dir / f"{photos[i % len(photos)][0]}-{i:06d}.jpg"
        path.write_bytes(blob)
        paths.append(path)
    return paths


def ensure_synthetic_shards(cache: Path, n: int, *, seed: int, workers: int) -> Path:
    """The synthetic set as shards in `cache`, built once and reused while it matches.

    A stamp file marks the folder as the benchmark's (so only then is it ever replaced) and
    records what it holds; it says `complete` only after the shard writer wrote its manifest."""
    from .shards import ShardError, ShardOptions, build_shards

    wanted = {"images": n, "size": list(SYNTH_SIZE), "quality": SYNTH_QUALITY, "seed": seed}
    stamp_path = cache / SYNTH_STAMP
    stamp = None
    if stamp_path.exists():
        with contextlib.suppress(ValueError, OSError):
            stamp = json.loads(stamp_path.read_text())
        if stamp == {**wanted, "complete": True} and (cache / "manifest.json").exists():
            print(f"reusing synthetic shards in {cache}", flush=True)
            return cache
        shutil.rmtree(cache)  # ours, but another set or an interrupted build
    elif cache.exists() and any(cache.iterdir()):
        raise BenchError(f"--cache {cache} is not empty and was not written by the benchmark; "
                         f"choose another folder")

    print(f"building {n} synthetic {SYNTH_SIZE[0]}x{SYNTH_SIZE[1]} JPEGs -> {cache}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps({**wanted, "complete": False}) + "\n")
    jpegs = cache.with_name(cache.name + ".jpegs")
    shutil.rmtree(jpegs, ignore_errors=True)
    try:
        make_synthetic_jpegs(jpegs, n, seed=seed, workers=workers)
        build_shards(ShardOptions(source=jpegs, output=cache, val_fraction=0.0,
                                  shard_size="256MB", seed=seed, workers=workers,
                                  progress=False))
    except ShardError as exc:
        raise BenchError(f"building the synthetic shards failed: {exc}") from None
    finally:
        shutil.rmtree(jpegs, ignore_errors=True)
    if not (cache / "manifest.json").exists():
        raise BenchError(f"the shard writer left no manifest.json in {cache}")
    _atomic_write(stamp_path, json.dumps({**wanted, "complete": True}) + "\n")
    return cache


def train_shards(shards: Path) -> ShardSet:
    """The train split of a shards folder, as the loaders see it (a ShardSet), or one clear error."""
    from .data import DataError
    from .data.shards_index import find_shards

    if not shards.is_dir():
        raise BenchError(f"--shards {shards}: no such folder")
    try:
        return find_shards(shards, "train")
    except DataError as exc:
        raise BenchError(f"--shards {shards}: {exc}") from None


# --------------------------------------------------------------------------------------------
# The tutorial's loader, reproduced faithfully (its per-sample CPU work is the point)
# --------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def index_tar_images(tars: list[Path]) -> list[tuple[str, int, int]]:
    """(tar path, data offset, size) of every image member: random access like the tutorial's
    list of file paths, read straight out of the shards so all loaders see the same bytes."""
    items = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES):
                    items.append((str(tar), m.offset_data, m.size))
    return items


class TutorialColorizationDataset(torch.utils.data.Dataset):
    """The tutorial's `ColorizationDataset` (train split) over tar members.

    Its length is the samples repeated `repeat` times: the benchmark must not measure epoch
    boundaries (a small set would leave most workers idle at each one), only per-sample work."""

    def __init__(self, items: list[tuple[str, int, int]], size: int, repeat: int = 1) -> None:
        from PIL import Image
        from torchvision import transforms

        self.items, self.repeat = items, repeat
        self.transforms = transforms.Compose([
            transforms.Resize((size, size), Image.BICUBIC),
            transforms.RandomHorizontalFlip(),
        ])
        self._files: dict[str, Any] = {}  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.items) * self.repeat

    def _read(self, idx: int) -> bytes:
        path, offset, size = self.items[idx % len(self.items)]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        f.seek(offset)
        return f.read(size)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        from PIL import Image
        from skimage.color import rgb2lab
        from torchvision import transforms

        img = Image.open(io.BytesIO(self._read(idx))).convert("RGB")
        img = self.transforms(img)
        img = np.array(img)
        img_lab = rgb2lab(img).astype("float32")
        img_lab = transforms.ToTensor()(img_lab)
        L = img_lab[[0], ...] / 50. - 1.
        ab = img_lab[[1, 2], ...] / 110.
        return {"L": L, "ab": ab}


def tutorial_batches(tars: list[Path], *, batch_size: int, size: int, workers: int,
                     device: torch.device, min_samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (L, ab) batches on `device` from the tutorial's DataLoader setup."""
    items = index_tar_images(tars)
    if not items:
        raise BenchError(f"no images inside {tars[0].parent}/train-*.tar")
    dataset = TutorialColorizationDataset(items, size, repeat=max(1, math.ceil(min_samples / len(items))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    while True:
        for batch in loader:
            yield (batch["L"].to(device, non_blocking=True),
                   batch["ab"].to(device, non_blocking=True))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    iterations: int
    items: int
    seconds: float
    first_s: float
    """Duration of the very first call (start-up, cuDNN autotuning, torch.compile...)."""

    @property
    def per_second(self) -> float:
        return self.items / self.seconds


def time_iterations(step: Callable[[], int], *, device: torch.device, seconds: float, warmup: int,
                    max_iters: int | None = None, quantum: int = 1) -> Timing:
    """Call `step` (which returns the items it handled) until `seconds` have passed.

    Warm-up calls (at least one: the first call is timed apart as start-up) are excluded. The
    device is synchronized only before reading the clock, so queued GPU work is counted without
    stalling the pipeline every step. `quantum` rounds the warm-up and timed counts to whole
    rounds of a round-robin DataLoader (one batch per worker): its workers finish their batches
    in bursts, and a window that cut a burst in half would be off by up to one burst."""
    quantum = max(1, quantum)
    start = time.perf_counter()
    step()
    synchronize(device)
    first_s = time.perf_counter() - start
    for _ in range(math.ceil(max(1, warmup) / quantum) * quantum - 1):
        step()
    synchronize(device)
    items = iters = 0
    start = time.perf_counter()
    while True:
        items += step()
        iters += 1
        if iters % quantum:
            continue
        if max_iters is not None and iters >= max_iters:
            break
        if time.perf_counter() - start >= seconds:
            break
    synchronize(device)
    return Timing(iters, items, time.perf_counter() - start, first_s)


# --------------------------------------------------------------------------------------------
# Input pipelines
# --------------------------------------------------------------------------------------------

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
    from .config import DataConfig
    from .data import DataError, build_loader

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


# --------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------

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

    from .config import Config
    from .gan_step import GanStep, build_networks

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


# --------------------------------------------------------------------------------------------
# Environment and results
# --------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dali_version() -> str | None:
    # The wheel's name carries the CUDA flavour (nvidia-dali-cuda130, -cuda120, ...).
    for d in importlib.metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{d.version} ({name})"
    return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and library versions, so that numbers from different runs can be compared."""
    cuda = device.type == "cuda"
    env: dict[str, Any] = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gib": (torch.cuda.get_device_properties(device).total_memory / 2**30
                           if cuda else None),
        "platform": platform.platform(),
    }
    env["versions"] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "cuda": torch.version.cuda,  # the CUDA torch was built for (also on a CPU-only machine)
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "dali": _dali_version(), "kornia": _version("kornia"),
        "webdataset": _version("webdataset"), "scikit-image": _version("scikit-image"),
        "pillow": _version("pillow"), "pix2pix_dist": __version__,
    }
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or "images_per_s" not in a or "images_per_s" not in b:
        return None
    return a["images_per_s"] / b["images_per_s"]


def summarize(results: dict[str, Any]) -> None:
    """Add the ratios and the target verdict to `results`."""
    loaders = results.get("data", {}).get("loaders", {})
    train = results.get("train", {})
    results["ratios"] = {
        "dali_over_tutorial": _ratio(loaders.get("dali"), loaders.get("tutorial")),
        "torch_over_tutorial": _ratio(loaders.get("torch"), loaders.get("tutorial")),
        "dali_over_torch": _ratio(loaders.get("dali"), loaders.get("torch")),
        "compile_over_eager": _ratio(train.get("compile"), train.get("eager")),
        # > 1: the input pipeline outruns the training step it has to feed.
        "dali_over_train_eager": _ratio(loaders.get("dali"), train.get("eager")),
    }
    dali = loaders.get("dali", {}).get("images_per_s")
    verdict = None
    if results["environment"]["device_type"] == "cuda" and dali is not None:
        verdict = "PASS" if dali >= DALI_TARGET_IMG_S else "FAIL"
    results["target"] = {
        "dali_images_per_s": DALI_TARGET_IMG_S,
        "tutorial_reference_images_per_s": TUTORIAL_REFERENCE_IMG_S,
        "defined_for": "one H100, 640x480 COCO-like JPEG shards, batch 256; tutorial: 16 workers",
        "verdict": verdict,
    }


def _fmt(x: float | None, spec: str = ",.1f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(results: dict[str, Any]) -> str:
    """The results as Markdown (also printed: it reads fine as plain text)."""
    env, st = results["environment"], results["settings"]
    lines = [f"# pix2pix_dist benchmark, {results['date']}", "",
             f"Device: **{env['device_name']}** ({env['device_type']}), {env['cpu_cores']} CPU cores "
             f"({env['cpu_model']})", ""]
    data = results.get("data")
    if data:
        lines += [f"## Input pipeline: {data['images']} images in {data['tars']} shard(s) at "
                  f"`{data['shards']}`, batch {st['batch_size']}, {st['workers']} workers/threads", "",
                  "| loader | img/s | batches | seconds | first batch s | batches/epoch | what it does |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, e in data["loaders"].items():
            if "error" in e:
                lines.append(f"| {name} | skipped | | | | | {e['error']} |")
            else:
                lines.append(f"| {name} | {_fmt(e['images_per_s'])} | {e['batches']} | "
                             f"{e['seconds']:.2f} | {e['first_batch_s']:.2f} | "
                             f"{e.get('batches_per_epoch', 'endless')} | {e.get('pipeline', '')} |")
        lines += ["", "The tutorial loader's dataset repeats (no epoch boundaries are timed); ours "
                      "run real epochs (DALI's reader never stops; the torch fallback starts new "
                      "DataLoader workers each epoch, which small sets make visible).", ""]
    train = results.get("train")
    if train:
        lines += [f"## Training step: batch {st['train_batch_size']}, crop {st['crop']}, "
                  f"num_downs {st['num_downs']}", "",
                  "| mode | img/s | ms/step | TFLOP/s | peak GPU GiB | first step s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for mode, e in train.items():
            lines.append(f"| {mode} | {_fmt(e['images_per_s'])} | {e['ms_per_step']:.1f} | "
                         f"{_fmt(e['tflop_per_s'], '.2f')} | {_fmt(e['peak_gpu_mem_gib'], '.2f')} | "
                         f"{e['first_step_s']:.1f} |")
        first = next(iter(train.values()))
        lines += ["", f"TFLOP/s use {first['gflop_per_image']:.1f} GFLOP/image/step: the unet_256 "
                      f"figure (86.0 at 256x256) scaled by (crop/256)^2.", ""]
    ratios = {k: v for k, v in results["ratios"].items() if v is not None}
    if ratios:
        lines += ["## Ratios", ""] + [f"- {k}: {v:.2f}x" for k, v in ratios.items()] + [""]
    t = results["target"]
    if t["verdict"] is not None:
        lines += [f"**DALI target {t['dali_images_per_s']:,.0f} img/s: {t['verdict']}** "
                  f"(target defined for {t['defined_for']})", ""]
    elif data:
        lines += [f"DALI target {t['dali_images_per_s']:,.0f} img/s: not judged (defined for "
                  f"{t['defined_for']}; this run is on {env['device_type']})", ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
              "## Settings", "", "```json", json.dumps(st, indent=1), "```", ""]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(results: dict[str, Any], output: Path) -> tuple[Path, Path]:
    """bench_results/<UTC date>-<device>.json and .md, each written atomically."""
    output.mkdir(parents=True, exist_ok=True)
    stamp = results["date"].replace(":", "").replace("-", "")
    stem = f"{stamp}-{slug(results['environment']['device_name'])}"
    json_path, md_path = output / f"{stem}.json", output / f"{stem}.md"
    _atomic_write(json_path, json.dumps(results, indent=2) + "\n")
    _atomic_write(md_path, format_report(results))
    return json_path, md_path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def run(s: BenchSettings) -> dict[str, Any]:
    """Every measurement the settings ask for, as one results dict (also written to disk)."""
    device = torch.device(s.device)
    results: dict[str, Any] = {
        "schema": 1,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "environment": environment(device),
        "settings": asdict(s),
    }
    if s.only != "train":
        if s.shards:
            shards = Path(s.shards)
            train_shards(shards)
            results["data_source"] = "existing shards"
        else:
            shards = ensure_synthetic_shards(Path(s.cache), s.synthetic, seed=s.seed,
                                             workers=s.workers)
            results["data_source"] = (f"synthetic: {s.synthetic} {SYNTH_SIZE[0]}x{SYNTH_SIZE[1]} "
                                      f"JPEG q{SYNTH_QUALITY} crops of scikit-image photos")
        results["data"] = measure_input_pipelines(s, shards, device)
    if s.only != "data":
        results["train"] = {"eager": measure_training(s, device, compiled=False)}
        if s.compile:
            results["train"]["compile"] = measure_training(s, device, compiled=True)
    summarize(results)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = parse_args(argv)
        results = run(settings)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path, md_path = write_results(results, Path(settings.output))
    print()
    print(format_report(results))
    print(f"results: {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
