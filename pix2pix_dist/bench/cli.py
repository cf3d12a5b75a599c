"""Entry point: run every measurement the settings ask for, print the report, write the results."""

from __future__ import annotations

import datetime as dt
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..cli import parse
from ..errors import run_main
from . import colorize_speed
from .colorize_speed import ColorizeBenchSettings
from .measure import measure_input_pipelines, measure_training, train_shards
from .report import environment, format_report, summarize, write_results
from .settings import BenchSettings, resolve
from .synthetic import SYNTH_QUALITY, SYNTH_SIZE, ensure_synthetic_shards

DESCRIPTION = ("Throughput of pix2pix_dist: the reference step (fp32, NCHW, eager, plain Adam) and "
               "ours side by side, end to end from shards through the training loop, with FLOPs, "
               "MFU and a batch sweep; the input pipelines alone (DALI, torch, tutorial) over a "
               "worker sweep; and colorize's seconds and peak memory against megapixels.")


def run(s: BenchSettings, command: str) -> dict[str, Any]:
    """Every measurement the settings ask for, as one results dict."""
    device = torch.device(s.device)
    results: dict[str, Any] = {
        "schema": 2,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "environment": environment(device),
        "settings": asdict(s),
    }
    if s.shards:
        shards = Path(s.shards)
        train_shards(shards)
        results["data_source"] = "existing shards"
    else:
        shards = ensure_synthetic_shards(Path(s.cache), s.synthetic, seed=s.seed, workers=s.workers)
        results["data_source"] = (f"synthetic: {s.synthetic} {SYNTH_SIZE[0]}x{SYNTH_SIZE[1]} "
                                  f"JPEG q{SYNTH_QUALITY} crops of scikit-image photos")
    if s.only in (None, "train"):
        results["train"] = measure_training(s, shards, device,
                                            results["environment"]["device_name"])
    if s.only in (None, "data"):
        results["data"] = measure_input_pipelines(s, shards, device)
    if s.only in (None, "colorize") and s.megapixels():
        # The loaders' colorize timing (colorize_speed.py): colorize against decode + encode and
        # its peak RSS, per photo size; one try each here (the curve, not the ratio's minimum).
        print(f"measuring colorize at {s.colorize_megapixels} MP ...", flush=True)
        cache = Path(s.cache)
        results["colorize"] = colorize_speed.run(ColorizeBenchSettings(
            sizes=s.colorize_megapixels, repeat=1, set_sizes="",  # the whole set: colorize_speed alone
            cache=str(cache.with_name(cache.name + "-colorize"))))
    summarize(results)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "pix2pix_dist.bench", *argv])

    def body() -> None:
        settings = resolve(parse(BenchSettings, argv, prog="python -m pix2pix_dist.bench",
                                 description=DESCRIPTION))
        results = run(settings, command)
        json_path, md_path = write_results(results, Path(settings.output))
        print("\n" + format_report(results))
        print(f"results: {json_path} and {md_path}")

    return run_main(body)
