"""The measurements: input pipelines (DALI, torch fallback, tutorial) and training points (the
reference step and ours, end to end from shards through the real training loop)."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BenchError
from .flops import generator_params, peak_bf16_tflops, step_flops_per_image
from .point import PointSpec, point_config, run_point
from .settings import BenchSettings
from .tutorial_loader import tutorial_batches

if TYPE_CHECKING:
    from ..data.shards_index import ShardSet

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

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batches(stream: Iterator[tuple[torch.Tensor, torch.Tensor]], s: BenchSettings,
                  device: torch.device, quantum: int) -> dict[str, float]:
    """Draw (L, ab) batches for `s.seconds` (at most `s.max_iters`) after `s.warmup` untimed ones.

    The first batch (start-up) is timed apart and counts as warm-up. The device is synchronized
    only before reading the clock, so queued GPU work is counted without stalling the pipeline
    every batch. `quantum` rounds the warm-up and timed counts to whole rounds of a round-robin
    DataLoader (one batch per worker): its workers finish their batches in bursts, and a window
    that cut a burst in half would be off by up to one burst."""
    start = time.perf_counter()
    next(stream)
    _synchronize(device)
    first_s = time.perf_counter() - start
    for _ in range(math.ceil(max(1, s.warmup) / quantum) * quantum - 1):
        next(stream)
    _synchronize(device)
    images = batches = 0
    start = time.perf_counter()
    while True:
        images += len(next(stream)[0])
        batches += 1
        if batches % quantum == 0 and (batches >= (s.max_iters or math.inf)
                                       or time.perf_counter() - start >= s.seconds):
            break
    _synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "batches": batches, "images": images,
            "seconds": seconds, "first_batch_s": first_s}


def _measure_loader(name: str, s: BenchSettings, shards: Path, split: ShardSet,
                    device: torch.device, workers: int) -> dict[str, Any]:
    """One timed window of one input pipeline with `workers` threads/workers over `split` (the
    train split of `shards`), or {"error": ...}."""
    from ..config import DataConfig
    from ..data import DataError, build_loader

    tars, images = [shard.tar for shard in split.shards], split.total
    entry: dict[str, Any] = {"batch_size": s.batch_size, "workers": workers}
    stream = loader = None
    try:
        if name == "tutorial":
            min_samples = s.batch_size * workers * 64  # never reach an epoch boundary
            stream = tutorial_batches(tars, batch_size=s.batch_size, size=s.crop,
                                      workers=workers, device=device, min_samples=min_samples)
            entry["pipeline"] = (f"PIL + Resize(({s.crop},{s.crop}), BICUBIC) + flip + "
                                 f"skimage rgb2lab, DataLoader({workers} workers)")
            quantum = workers
        else:
            cfg = DataConfig(shards=str(shards), backend=name, load_size=s.load_size,
                             crop_size=s.crop, num_threads=workers,
                             shuffle_buffer=max(1, min(DataConfig.shuffle_buffer, images)))
            loader = build_loader(split, cfg, batch_size=s.batch_size, rank=0, world_size=1,
                                  device=device, seed=s.seed)
            entry.update(backend=loader.backend, batches_per_epoch=len(loader),
                         pipeline=f"resize {s.load_size} + crop {s.crop} + flip + Lab")
            # Epochs 0, 1, 2, ...: each iter() of a Loader is its next epoch.
            stream = itertools.chain.from_iterable(itertools.repeat(loader))
            # DALI threads and the torch fallback's per-sample worker stream deliver batches
            # smoothly; only the tutorial's per-batch workers arrive in bursts.
            quantum = 1
        entry.update(_time_batches(stream, s, device, quantum))
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001 -- e.g. DALI missing: report it, measure the rest
        entry["error"] = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        print(f"  {name}: skipped: {entry['error']}", flush=True)
    finally:
        stream = loader = None  # noqa: F841 -- stop workers before the next loader starts
        gc.collect()
    return entry


def spread(values: list[float]) -> dict[str, float]:
    """min, median and max of `values` (the figure is the median; min-max is its spread)."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure from repeated runs: the median run's entry (a real run, not a mean: the lower
    middle one of an even count, so all its figures belong together), with every run's images/s
    and their spread."""
    rates = [r["images_per_s"] for r in runs]
    middle = runs[rates.index(statistics.median_low(rates))]
    return {**middle, "runs_images_per_s": rates, "run_spread": spread(rates)}


def _round_ratios(over: list[dict[str, Any]], under: list[dict[str, Any]]) -> list[float]:
    """One ratio per round: `over`'s images/s over `under`'s, run side by side."""
    return [a["images_per_s"] / b["images_per_s"] for a, b in zip(over, under)]


def measure_input_pipelines(s: BenchSettings, shards: Path, device: torch.device) -> dict[str, Any]:
    """img/s of the DALI loader, the torch fallback and the tutorial loader on `shards`: at
    `s.workers` in `s.repeats` interleaved rounds (the ratios and their spread), then once at
    each other count of the worker sweep (the scaling curve)."""
    split = train_shards(shards)
    by_workers = []
    for workers in s.worker_sweep():
        rounds = s.repeats if workers == s.workers else 1
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LOADERS}
        failed: dict[str, dict[str, Any]] = {}
        for i in range(rounds):
            for name in LOADERS:
                if name in failed:
                    continue
                print(f"measuring input pipeline: {name}, {workers} worker(s)"
                      f"{f', round {i + 1}/{rounds}' if rounds > 1 else ''} ...", flush=True)
                entry = _measure_loader(name, s, shards, split, device, workers)
                if "error" in entry:
                    failed[name] = entry
                else:
                    runs[name].append(entry)
        loaders = {name: failed.get(name) or median_run(runs[name]) for name in LOADERS}
        by_workers.append({"workers": workers, "loaders": loaders,
                           "round_ratios": {f"{name}_over_tutorial": _round_ratios(runs[name], runs["tutorial"])
                                            for name in ("dali", "torch")}})
    main = next(w for w in by_workers if w["workers"] == s.workers)
    return {"shards": str(shards), "images": split.total, "tars": len(split.shards),
            "loaders": main["loaders"], "round_ratios": main["round_ratios"],
            "by_workers": by_workers}


# Training points

INPUT_BOUND_WAIT = 0.05
"""A point whose loop waited for data more than this fraction of the time is input-bound."""


def training_rounds(s: BenchSettings, base: PointSpec) -> list[tuple[PointSpec, ...]]:
    """The training points in the order they run: `s.repeats` interleaved rounds of the reference
    and ours at the same batch (with more than one process, ours twice: model.norm=batch and
    batch_local), then ours once at each other batch of the sweep, then the resnet18-unet point
    (with `s.resnet`). The reference keeps pix2pix's habits under DDP: plain BatchNorm, each
    process over its own images."""
    reference = dataclasses.replace(base, kind="reference", norm="batch_local")
    local = [dataclasses.replace(base, norm="batch_local")] if base.processes > 1 else []
    resnet = [dataclasses.replace(base, kind="resnet18-unet")] if s.resnet else []
    return [(reference, base, *local)] * s.repeats + [
        (dataclasses.replace(base, batch=b),) for b in s.sweep() if b != base.batch] + [
        (spec,) for spec in resnet]


def _key(spec: PointSpec) -> tuple[str, int, str]:
    return spec.kind, spec.batch, spec.norm


def measure_training(s: BenchSettings, shards: Path, device: torch.device,
                     device_name: str) -> dict[str, Any]:
    """The training points of `training_rounds`, each in its own process(es); FLOPs per image
    counted on our real step (and on the resnet18-unet's); achieved TFLOP/s and MFU against the
    bf16 peak of the `s.processes` devices."""
    from accelerate import Accelerator

    base = PointSpec(kind="ours", batch=s.train_batch_size, shards=str(shards), crop=s.crop,
                     load_size=s.load_size, num_downs=s.num_downs, ngf=s.ngf, ndf=s.ndf,
                     workers=s.workers, warmup=s.warmup, steps=s.steps, log_every=s.log_every,
                     compile=s.compile, seed=s.seed, run_dir="", processes=s.processes)
    rounds = training_rounds(s, base)
    specs = list({_key(spec): spec for specs in rounds for spec in specs}.values())
    reference, _, *local = rounds[0]  # the first round: the reference, ours, ours batch_local
    # FLOPs and generator parameters per kind of network (the reference runs ours' networks).
    cost: dict[str, dict[str, float]] = {}
    for spec in specs:
        if spec.kind in cost or spec.kind == "reference":
            continue
        print(f"counting FLOPs of one training step ({spec.kind}) ...", flush=True)
        cfg = point_config(spec, device.type)
        cost[spec.kind] = {"flops_per_image": step_flops_per_image(
            cfg, Accelerator(cpu=device.type != "cuda"), s.crop),
            "generator_params": generator_params(cfg)}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cost["reference"] = cost["ours"]
    flops = cost["ours"]["flops_per_image"]
    peak = peak_bf16_tflops(device_name) if device.type == "cuda" else None
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, int, str], str] = {}
    for i, round_specs in enumerate(rounds):
        for spec in round_specs:
            if _key(spec) in errors:
                continue
            norm = f", model.norm={spec.norm}" if s.processes > 1 else ""
            print(f"measuring training: {spec.kind}{norm}, batch {spec.batch}"
                  f"{f' x {s.processes} processes' if s.processes > 1 else ''}"
                  f"{f', round {i + 1}/{s.repeats}' if i < s.repeats else ''} ...", flush=True)
            result = run_point(spec, s.point_timeout)
            if "error" in result:
                print(f"  skipped: {result['error']}", flush=True)
                errors[_key(spec)] = result["error"]
            else:
                print(f"  {result['images_per_s']:.2f} img/s", flush=True)
                runs.setdefault(_key(spec), []).append(result)
    points = []
    for spec in specs:
        key = _key(spec)
        entry: dict[str, Any] = {"kind": spec.kind, "batch": spec.batch, "norm": spec.norm,
                                 "processes": spec.processes, **cost[spec.kind]}
        if key in errors:
            entry["error"] = errors[key]
        else:
            entry.update(median_run(runs[key]))
            entry["interval_spread"] = spread([x for run in runs[key]
                                               for x in run["interval_images_per_s"]])
            entry["tflop_per_s"] = entry["images_per_s"] * entry["flops_per_image"] / 1e12
            entry["mfu"] = entry["tflop_per_s"] / (peak * spec.processes) if peak else None
            entry["bottleneck"] = ("input pipeline" if entry["data_wait_frac"] > INPUT_BOUND_WAIT
                                   else "training step")
        points.append(entry)
    return {"flops_per_image": flops, "flop_count": "torch.utils.flop_counter.FlopCounterMode "
            "on one eager call of the training step (convolutions and matmuls, forward and backward)",
            "peak_bf16_tflops": peak, "peak_source": (device_name if peak else "unknown"),
            "processes": s.processes, "points": points,
            # One ratio per round (ours over the reference run just before it; with more than
            # one process also model.norm=batch over batch_local): their median is the headline
            # ratio, their min-max its spread.
            "round_ratios": _round_ratios(runs.get(_key(base), []), runs.get(_key(reference), [])),
            "norm_round_ratios": (_round_ratios(runs.get(_key(base), []), runs.get(_key(local[0]), []))
                                  if local else [])}
