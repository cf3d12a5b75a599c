"""Environment, ratios and the PASS/FAIL verdict, the Markdown report and the results files."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_write

DALI_TARGET_IMG_S = 20_000.0
"""The issue's target: DALI input pipeline on one H100 with 640x480 COCO-like JPEG shards."""
TUTORIAL_REFERENCE_IMG_S = 720.0
"""What the tutorial loader gives with 16 workers on that machine (for context only)."""


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

def write_results(results: dict[str, Any], output: Path) -> tuple[Path, Path]:
    """bench_results/<UTC date>-<device>.json and .md, each written atomically."""
    output.mkdir(parents=True, exist_ok=True)
    stamp = results["date"].replace(":", "").replace("-", "")
    stem = f"{stamp}-{slug(results['environment']['device_name'])}"
    json_path, md_path = output / f"{stem}.json", output / f"{stem}.md"
    atomic_write(json_path, json.dumps(results, indent=2) + "\n")
    atomic_write(md_path, format_report(results))
    return json_path, md_path
