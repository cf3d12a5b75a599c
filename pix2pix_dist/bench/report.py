"""Environment, ratios and the PASS/FAIL verdict, the Markdown report and the results files."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_write

DALI_TARGET_IMG_S = 20_000.0
"""The issue's target: DALI input pipeline on one H100 with 640x480 COCO-like JPEG shards."""
TUTORIAL_REFERENCE_IMG_S = 720.0
"""What the tutorial loader gives with 16 workers on that machine (for context only)."""
TRAIN_TARGET_IMG_S = 5_000.0
"""The issue's target: end-to-end training images/s on one H100/H200 (256x256, bf16, shards)."""
SPEEDUP_TARGET = 5.0
"""The issue's target: ours over the reference step at batch 16, measured in the same run."""


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


def _driver_version() -> str | None:
    """The NVIDIA driver's version, as nvidia-smi reports it (None without one)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and library versions, so that numbers from different runs can be compared."""
    cuda = device.type == "cuda"
    return {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gib": (torch.cuda.get_device_properties(device).total_memory / 2**30
                           if cuda else None),
        "driver": _driver_version() if cuda else None,
        "platform": platform.platform(),
        # Other jobs on the machine: what the spreads have to absorb.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "cuda": torch.version.cuda,  # the CUDA torch was built for (also on a CPU-only machine)
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "dali": _dali_version(), "kornia": _version("kornia"),
            "accelerate": _version("accelerate"), "webdataset": _version("webdataset"),
            "scikit-image": _version("scikit-image"), "pillow": _version("pillow"),
            "pix2pix_dist": __version__,
        },
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or "images_per_s" not in a or "images_per_s" not in b:
        return None
    return a["images_per_s"] / b["images_per_s"]


def _ours(points: list[dict[str, Any]], norm: str = "batch") -> list[dict[str, Any]]:
    """Our measured points with model.norm `norm` (results written before the norm was recorded:
    `batch`, the default, which they ran)."""
    return [p for p in points if p["kind"] == "ours" and p.get("norm", "batch") == norm
            and "error" not in p]


def training_highlights(train: dict[str, Any], batch: int) -> dict[str, dict[str, Any] | None]:
    """The reference point, ours at the reference's batch, and ours at its fastest batch (ours:
    train.py's defaults, model.norm=batch)."""
    points = [p for p in train.get("points", []) if "error" not in p]
    ours = _ours(points)
    return {
        "reference": next((p for p in points if p["kind"] == "reference"), None),
        "ours_same_batch": next((p for p in ours if p["batch"] == batch), None),
        "ours_best": max(ours, key=lambda p: p["images_per_s"], default=None),
    }


def summarize(results: dict[str, Any]) -> None:
    """Add the ratios and the targets' verdicts to `results`."""
    loaders = results.get("data", {}).get("loaders", {})
    train = results.get("train", {})
    batch = results["settings"]["train_batch_size"]
    top = training_highlights(train, batch)
    results["highlights"] = {k: (v["batch"] if v else None) for k, v in top.items()}
    # With more than one process: ours with per-process statistics beside it (none otherwise).
    local = next((p for p in _ours(train.get("points", []), "batch_local") if p["batch"] == batch),
                 None)
    # Ratios measured side by side get one value per round: the ratio is their median, and
    # their min-max is its spread; the others are ratios of medians.
    rounds = {"ours_over_reference_same_batch": train.get("round_ratios") or [],
              "batch_over_batch_local": train.get("norm_round_ratios") or [],
              **results.get("data", {}).get("round_ratios", {})}
    results["ratios"] = {
        "ours_over_reference_same_batch": _ratio(top["ours_same_batch"], top["reference"]),
        "ours_best_over_reference": _ratio(top["ours_best"], top["reference"]),
        # The cost of statistics over every process's images (> 1: batch is faster).
        "batch_over_batch_local": _ratio(top["ours_same_batch"], local),
        "dali_over_tutorial": _ratio(loaders.get("dali"), loaders.get("tutorial")),
        "torch_over_tutorial": _ratio(loaders.get("torch"), loaders.get("tutorial")),
        "dali_over_torch": _ratio(loaders.get("dali"), loaders.get("torch")),
        # > 1: the input pipeline alone outruns the fastest training point it has to feed.
        "dali_over_ours_best": _ratio(loaders.get("dali"), top["ours_best"]),
    }
    results["ratio_spreads"] = {}
    for key, values in rounds.items():
        if values:
            results["ratios"][key] = statistics.median(values)
            results["ratio_spreads"][key] = {"min": min(values), "max": max(values),
                                             "rounds": len(values)}
    env, st = results["environment"], results["settings"]
    # The issue's targets are defined for one H100/H200 with the default 256x256 networks.
    judged = (env["device_type"] == "cuda" and st["crop"] == 256 and st["num_downs"] == 8
              and st["ngf"] == st["ndf"] == 64 and st.get("processes", 1) == 1)

    def verdict(value: float | None, target: float) -> str | None:
        return None if not judged or value is None else ("PASS" if value >= target else "FAIL")

    best = top["ours_best"]["images_per_s"] if top["ours_best"] else None
    results["targets"] = {
        "defined_for": "one H100/H200, 256x256 crops, num_downs 8, bf16, from 640x480 shards",
        "dali_images_per_s": {"target": DALI_TARGET_IMG_S,
                              "verdict": verdict(loaders.get("dali", {}).get("images_per_s"),
                                                 DALI_TARGET_IMG_S)},
        "end_to_end_images_per_s": {"target": TRAIN_TARGET_IMG_S,
                                    "verdict": verdict(best, TRAIN_TARGET_IMG_S)},
        "ours_over_reference_batch_16": {
            "target": SPEEDUP_TARGET,
            "verdict": verdict(results["ratios"]["ours_over_reference_same_batch"], SPEEDUP_TARGET)
            if st["train_batch_size"] == 16 else None},
        "tutorial_reference_images_per_s": TUTORIAL_REFERENCE_IMG_S,
    }


def _fmt(x: float | None, spec: str = ",.1f") -> str:
    return "-" if x is None else format(x, spec)


def _spread(entry: dict[str, Any], key: str, spec: str = ",.1f") -> str:
    """`min-max` of a figure's spread entry, or - when it has none."""
    sp = entry.get(key)
    return "-" if not sp else f"{format(sp['min'], spec)}-{format(sp['max'], spec)}"


POINT_NAMES = {"reference": ("reference (fp32, NCHW, eager, plain Adam)", None),
               "ours": ("ours", None), "resnet18-unet": ("ours, resnet18-unet", "resnet18-unet")}
"""Each point kind's row name and generator (None: the pix2pix U-Net of --num-downs)."""

NORM_ROWS = {"batch": "model.norm=batch (cross-process statistics)",
             "batch_local": "model.norm=batch_local (per-process statistics)"}
"""What ours' row adds to its name with more than one process: whose images BatchNorm sees."""


def point_name(p: dict[str, Any]) -> tuple[str, str | None]:
    """A point's row name and generator (None: the pix2pix U-Net of --num-downs)."""
    name, generator = POINT_NAMES.get(p["kind"], (p["kind"], p["kind"]))
    if p["kind"] == "ours" and p.get("processes", 1) > 1:
        name = f"{name}, {NORM_ROWS[p['norm']]}"
    return name, generator

SPEED_KEYS = ("mixed_precision", "channels_last", "fused_adam", "compile", "sync_every", "d_concat")


def _settings_used(points: list[dict[str, Any]], device_type: str, processes: int) -> list[str]:
    """Which speed settings each kind of point ran, as train.py resolved them, and why; with
    more than one process, what each BatchNorm row is."""
    lines = []
    for kind in ("reference", "ours"):
        p = next((p for p in points if p["kind"] == kind and "train_config" in p), None)
        if p:
            used = ", ".join(f"{k}={p['train_config'][k]}" for k in SPEED_KEYS)
            lines.append(f"- {kind}: {used}")
    why = ("the reference is the original pix2pix habits; ours is `train.py`'s defaults, resolved "
           f"for {device_type} by pix2pix_dist/device_defaults.py (the same function train.py "
           "calls): the speed options measured fastest on this kind of device "
           "(docs/design.md, \"Per-device defaults\")")
    if processes > 1:
        why += (f". On {processes} processes each row's batch is per process and img/s count "
                f"all processes' images; ours runs twice at the reference's batch: "
                f"model.norm=batch (train.py's default: each BatchNorm layer's statistics over "
                f"all {processes} processes' images, one small collective per layer per forward "
                f"and backward) and model.norm=batch_local (each process's own images, no "
                f"communication); the reference keeps plain BatchNorm per process, as pix2pix "
                f"under DDP (docs/design.md, \"BatchNorm over the recipe's batch\")")
    return lines + [f"- why: {why}"] if lines else []


def format_report(results: dict[str, Any]) -> str:
    """The results as Markdown (also printed: it reads fine as plain text)."""
    env, st = results["environment"], results["settings"]
    lines = [f"# pix2pix_dist benchmark, {results['date']}", "",
             f"Device: **{env['device_name']}** ({env['device_type']}), driver "
             f"{env.get('driver') or '-'}, {env['cpu_cores']} CPU cores ({env['cpu_model']})"
             + (f", load average {env['load_average']:.2f} at the start"
                if env.get("load_average") is not None else ""), "",
             f"Command: `{results['command']}`", ""]
    ratios = {k: v for k, v in results["ratios"].items() if v is not None}
    if ratios:
        spreads = results.get("ratio_spreads", {})
        lines += ["## Ratios", "", "Side-by-side ratios are the median over interleaved rounds, "
                  "with their min-max.", ""]
        for k, v in ratios.items():
            sp = spreads.get(k)
            lines.append(f"- {k}: **{v:.2f}x**" + (
                f" (min {sp['min']:.2f}x, max {sp['max']:.2f}x over {sp['rounds']} rounds)"
                if sp else ""))
        lines.append("")
    train = results.get("train")
    if train:
        gflop = train["flops_per_image"] / 1e9
        peak = train["peak_bf16_tflops"]
        processes = train.get("processes", 1)
        on = (f" on {processes} processes each (batch per process; img/s of all processes)"
              if processes > 1 else "")
        lines += [f"## Training, end to end: shards -> loader -> the training loop "
                  f"(crop {st['crop']}, num_downs {st['num_downs']}, ngf {st['ngf']}, ndf {st['ndf']})"
                  f"{on}", "",
                  "| step | generator | G params (M) | GFLOP/image | batch | img/s (median) | "
                  "runs min-max | intervals min-max | step-only img/s | data wait | bottleneck | "
                  "TFLOP/s | MFU | peak GPU GiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        unet = f"unet_{2 ** st['num_downs']}"
        for p in train["points"]:
            name, generator = point_name(p)
            # Results written before points carried their own cost: the U-Net's, for the run.
            params, flops = p.get("generator_params"), p.get("flops_per_image", train["flops_per_image"])
            head = (f"| {name} | {generator or unet} | {_fmt(params and params / 1e6, ',.2f')} | "
                    f"{flops / 1e9:.2f} | {p['batch']}")
            if "error" in p:
                lines.append(f"{head} | skipped: {p['error']} | | | | | | | | |")
                continue
            mfu = "-" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%"
            lines.append(
                f"{head} | {_fmt(p['images_per_s'], ',.2f')} | "
                f"{_spread(p, 'run_spread', ',.2f')} ({len(p['runs_images_per_s'])}) | "
                f"{_spread(p, 'interval_spread', ',.2f')} | "
                f"{_fmt(p['step_images_per_s'], ',.2f')} | {100 * p['data_wait_frac']:.1f}% | "
                f"{p['bottleneck']} | {_fmt(p['tflop_per_s'], '.3g')} | {mfu} | "
                f"{_fmt(p['peak_gpu_mem_gib'], '.2f')} |")
        lines += ["", f"FLOPs per image (D step + G step), counted by FlopCounterMode on the "
                      f"real step: {gflop:.2f} GFLOP for {unet}. MFU against the dense bf16 peak of "
                      f"{'%g TFLOP/s (%s)' % (peak, train['peak_source']) if peak else 'an unknown device'}"
                      f"{f' per GPU, x {processes}' if peak and processes > 1 else ''}"
                      f". Every run times {st['steps']} steps (intervals of {math.gcd(st['warmup'], st['steps'])}) "
                      f"after {st['warmup']} warm-up steps; the reference and ours"
                      f"{' (both norms)' if processes > 1 else ''} at batch "
                      f"{st['train_batch_size']} ran in {st['repeats']} interleaved rounds "
                      f"(runs min-max, number of runs in brackets), the sweep's other batches "
                      f"once (intervals min-max).", "", "Settings used:", ""]
        lines += _settings_used(train["points"], env["device_type"], processes) + [""]
    data = results.get("data")
    if data:
        lines += [f"## Input pipeline alone: {data['images']} images in {data['tars']} shard(s) at "
                  f"`{data['shards']}`, batch {st['batch_size']}", "",
                  "| loader | workers/threads | img/s (median) | runs min-max | batches | "
                  "seconds | first batch s | batches/epoch | what it does |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for w in data.get("by_workers", [{"workers": st["workers"], "loaders": data["loaders"]}]):
            for name, e in w["loaders"].items():
                if "error" in e:
                    lines.append(f"| {name} | {w['workers']} | skipped | | | | | | {e['error']} |")
                else:
                    lines.append(
                        f"| {name} | {w['workers']} | {_fmt(e['images_per_s'])} | "
                        f"{_spread(e, 'run_spread')} ({len(e.get('runs_images_per_s', [1]))}) | "
                        f"{e['batches']} | {e['seconds']:.2f} | {e['first_batch_s']:.2f} | "
                        f"{e.get('batches_per_epoch', 'endless')} | {e.get('pipeline', '')} |")
        lines += ["", f"At {st['workers']} workers the loaders ran in {st['repeats']} interleaved "
                      f"rounds; other counts once. The tutorial loader's dataset repeats (no epoch "
                      f"boundaries are timed); ours run real epochs.", ""]
    colorize = results.get("colorize")
    if colorize:
        lines += ["## Colorize cost against photo size (pix2pix_dist/bench/colorize_speed.py, "
                  f"{colorize['format']} out, {colorize['threads']} threads)", "",
                  "| megapixels | colorize s | decode+encode s | ratio | peak RSS MiB | "
                  "s per added MP | MiB per added MP |", "|---:|---:|---:|---:|---:|---:|---:|"]
        previous = None
        for c in colorize["photos"]:
            # The slope from the previous size: the per-pixel cost without the fixed part
            # (the network runs at crop size whatever the photo's size; the imports).
            slope = ("-", "-")
            if previous is not None and c["megapixels"] > previous["megapixels"]:
                added = c["megapixels"] - previous["megapixels"]
                slope = (f"{(c['colorize_s'] - previous['colorize_s']) / added:.2f}",
                         f"{(c.get('peak_rss_mib', 0) - previous.get('peak_rss_mib', 0)) / added:.0f}")
            lines.append(f"| {c['megapixels']:.1f} | {c['colorize_s']:.2f} | {c['floor_s']:.2f} | "
                         f"{c['ratio']:.2f}x | {_fmt(c.get('peak_rss_mib'), ',.0f')} | "
                         f"{slope[0]} | {slope[1]} |")
            previous = c
        lines += ["", "Colorize: its per-file work (decode, network, full-resolution colour, "
                      "encode + write); peak RSS: a `pix2pix-colorize` process on that photo, "
                      "imports included.", ""]
    t = results["targets"]
    lines += [f"## Targets ({t['defined_for']})", ""]
    for key in ("dali_images_per_s", "end_to_end_images_per_s", "ours_over_reference_batch_16"):
        v = t[key]["verdict"]
        lines.append(f"- {key} >= {t[key]['target']:,g}: {v or 'not judged on this run'}")
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
              "## Settings", "", "```json", json.dumps(st, indent=1), "```", ""]
    return "\n".join(lines)


def write_results(results: dict[str, Any], output: Path) -> tuple[Path, Path]:
    """<output>/<UTC date and time>-<device>.json and .md, each written atomically; a CPU run's
    device part is `cpu-<cpu model>` (.gitignore keeps those out of benchmarks/results/)."""
    output.mkdir(parents=True, exist_ok=True)
    stamp = results["date"].replace(":", "").replace("-", "")
    env = results["environment"]
    stem = f"{stamp}-{'cpu-' if env['device_type'] == 'cpu' else ''}{slug(env['device_name'])}"
    json_path, md_path = output / f"{stem}.json", output / f"{stem}.md"
    atomic_write(json_path, json.dumps(results, indent=2) + "\n")
    atomic_write(md_path, format_report(results))
    return json_path, md_path
