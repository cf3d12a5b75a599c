"""Entry point: run every measurement the settings ask for, print the report, write the results."""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .errors import BenchError
from .measure import measure_input_pipelines, measure_training, train_shards
from .report import environment, format_report, summarize, write_results
from .settings import BenchSettings, parse_args
from .synthetic import SYNTH_QUALITY, SYNTH_SIZE, ensure_synthetic_shards


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
