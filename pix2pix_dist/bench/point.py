"""One training point of the benchmark: the real training loop (train_loop.train) fed by the real
loader from shards, run in its own process, timed from the loop's own per-interval statistics.

Its own process, because each point needs a fresh Accelerate state (the reference runs in fp32,
ours in bf16, and Accelerate allows one precision per process), a fresh torch.compile cache (a
second batch size would otherwise be compiled with dynamic shapes) and its own peak memory.

    python -m pix2pix_dist.bench.point SPEC.json RESULT.json      (the benchmark runs this)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import device_defaults
from ..atomic import atomic_write
from ..config import Config

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class PointSpec:
    kind: Literal["reference", "ours", "resnet18-unet"]
    """`resnet18-unet`: ours (the same settings) with model.generator=resnet18-unet, fresh encoder
    weights (model.encoder_weights=none: never a download)."""
    batch: int
    shards: str
    crop: int
    load_size: int
    num_downs: int
    ngf: int
    ndf: int
    workers: int
    warmup: int
    """Untimed first steps (a whole number of log intervals)."""
    steps: int
    """Timed steps after the warm-up (a whole number of log intervals)."""
    log_every: int
    compile: bool
    seed: int
    run_dir: str


def point_config(spec: PointSpec, device_type: str) -> Config:
    """The run a point trains: our defaults as train.py resolves them on `device_type`
    (device_defaults.py), or the reference's habits (fp32, NCHW, eager, plain Adam, host-checked
    skips), with the same networks, losses, data and batch."""
    cfg = Config()
    d, t = cfg.data, cfg.train
    d.shards, d.batch_size, d.num_threads = spec.shards, spec.batch, spec.workers
    d.crop_size, d.load_size = spec.crop, spec.load_size
    cfg.model.num_downs, cfg.model.ngf, cfg.model.ndf = spec.num_downs, spec.ngf, spec.ndf
    if spec.kind == "resnet18-unet":
        cfg.model.generator, cfg.model.encoder_weights = spec.kind, "none"
    total = spec.warmup + spec.steps
    t.steps, t.seed = total, spec.seed
    cfg.optim.decay_fraction = 0.0  # constant lr: the schedule is not what is measured
    cfg.log.tracker, cfg.log.every = "none", spec.log_every
    cfg.log.sample_every, cfg.log.sample_count = total, 1  # one small grid, after the timing
    cfg.ckpt.every, cfg.ckpt.keep = total, 1
    cfg.run_dir = spec.run_dir
    if spec.kind == "reference":
        t.mixed_precision, t.channels_last, t.compile, t.fused_adam = "no", False, False, False
    else:  # train.py's defaults, resolved for this device by the one rule train() applies
        t.compile = spec.compile
    return device_defaults.resolve(cfg, device_type)


def timed_rows(rows: list[dict[str, Any]], spec: PointSpec) -> dict[str, Any]:
    """images/s, data-wait fraction and step-only images/s over the timed log intervals.

    Each row covers `log_every` steps of `batch` images and holds that interval's images/s and
    data-wait fraction; the intervals' durations are added up, not their rates averaged."""
    timed = [r for r in rows if r["step"] > spec.warmup and "perf/images_per_s" in r]
    if not timed:
        raise ValueError(f"no timed log interval after step {spec.warmup}")
    per_row = spec.log_every * spec.batch
    images = per_row * len(timed)
    seconds = sum(per_row / r["perf/images_per_s"] for r in timed)
    wait = sum(r["perf/data_wait_frac"] * per_row / r["perf/images_per_s"] for r in timed)
    mem = [r["perf/gpu_mem_gib"] for r in timed if "perf/gpu_mem_gib" in r]
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images,
            "interval_images_per_s": [r["perf/images_per_s"] for r in timed],
            "timed_steps": spec.log_every * len(timed), "data_wait_frac": wait / seconds,
            "step_images_per_s": images / (seconds - wait) if seconds > wait else None,
            "peak_gpu_mem_gib": max(mem) if mem else None}


def run_point(spec: PointSpec, timeout: float) -> dict[str, Any]:
    """Train the point in a child process; its measurements, or {"error": one line}."""
    work = Path(tempfile.mkdtemp(prefix="bench-point-"))
    spec = dataclasses.replace(spec, run_dir=str(work / "run"))
    spec_path, result_path, log_path = work / "spec.json", work / "result.json", work / "log.txt"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "pix2pix_dist.bench.point", str(spec_path),
                                   str(result_path)], stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, timeout=timeout)
        if proc.returncode == 0 and result_path.exists():
            return json.loads(result_path.read_text())
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return {"error": lines[-1][:300] if lines else f"exit code {proc.returncode}"}
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within --point-timeout {timeout:g} s"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    """The child: train the spec's run, then write its timed measurements."""
    from ..train_loop import train

    spec = PointSpec(**json.loads(Path(argv[0]).read_text()))
    cfg = point_config(spec, device_defaults.device_type())
    train(cfg.validate())
    stats = (Path(cfg.run_dir) / "stats.jsonl").read_text().splitlines()
    bf16 = cfg.train.mixed_precision == "bf16"
    result = {**timed_rows([json.loads(line) for line in stats], spec),
              "precision": "bf16 autocast" if bf16 else "fp32",
              "train_config": dataclasses.asdict(cfg.train)}
    atomic_write(Path(argv[1]), json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
