"""One training point of the benchmark: the real training loop (train_loop.train) fed by the real
loader from shards, run in its own process (or `processes` of them, under torchrun), timed from
the loop's own per-interval statistics.

Its own process, because each point needs a fresh Accelerate state (the reference runs in fp32,
ours in bf16, and Accelerate allows one precision per process), a fresh torch.compile cache (a
second batch size would otherwise be compiled with dynamic shapes) and its own peak memory.

    python -m pix2pix_dist.bench.point SPEC.json RESULT.json      (the benchmark runs this)
    python -m torch.distributed.run --standalone --nproc_per_node N \
        -m pix2pix_dist.bench.point SPEC.json RESULT.json          (with spec.processes = N)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
import torch

from .. import device_defaults
from ..atomic import atomic_write
from ..config import Config
from ..errors import rank_and_world, report_error, run_main
from ..imageio import first_line

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
    norm: Literal["batch", "batch_local"] = "batch"
    """model.norm: `batch` (ours' default: statistics over all processes' images) or
    `batch_local` (each process's own images: the reference's plain BatchNorm under DDP). The
    same layer on one process."""
    processes: int = 1
    """Training processes (torchrun; gloo on a CPU, NCCL on CUDA); `batch` is per process."""


def point_config(spec: PointSpec, device_type: str) -> Config:
    """The run a point trains: our defaults as train.py resolves them on `device_type`
    (device_defaults.py), or the reference's habits (fp32, NCHW, eager, plain Adam, host-checked
    skips), with the same networks, losses, data and batch."""
    cfg = Config()
    d, t = cfg.data, cfg.train
    d.shards, d.batch_size, d.num_threads = spec.shards, spec.batch, spec.workers
    d.crop_size, d.load_size = spec.crop, spec.load_size
    cfg.model.num_downs, cfg.model.ngf, cfg.model.ndf = spec.num_downs, spec.ngf, spec.ndf
    cfg.model.norm = spec.norm
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

    Each row covers `log_every` steps of `batch` images per process (all processes' images
    count) and holds that interval's images/s and data-wait fraction (rank 0's); the intervals'
    durations are added up, not their rates averaged."""
    timed = [r for r in rows if r["step"] > spec.warmup and "perf/images_per_s" in r]
    if not timed:
        raise ValueError(f"no timed log interval after step {spec.warmup}")
    per_row = spec.log_every * spec.batch * spec.processes
    images = per_row * len(timed)
    seconds = sum(per_row / r["perf/images_per_s"] for r in timed)
    wait = sum(r["perf/data_wait_frac"] * per_row / r["perf/images_per_s"] for r in timed)
    mem = [r["perf/gpu_mem_gib"] for r in timed if "perf/gpu_mem_gib" in r]
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images,
            "interval_images_per_s": [r["perf/images_per_s"] for r in timed],
            "timed_steps": spec.log_every * len(timed), "data_wait_frac": wait / seconds,
            "step_images_per_s": images / (seconds - wait) if seconds > wait else None,
            "peak_gpu_mem_gib": max(mem) if mem else None}


def point_command(spec: PointSpec, spec_path: Path, result_path: Path) -> list[str]:
    """The child's command line: one process, or `spec.processes` of them under torchrun
    (`--standalone`: a free local port; gloo on a CPU, NCCL on CUDA, as Accelerate picks)."""
    child = ["-m", "pix2pix_dist.bench.point", str(spec_path), str(result_path)]
    if spec.processes == 1:
        return [sys.executable, *child]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(spec.processes), *child]


def kill_tree(pid: int) -> None:
    """SIGKILL process `pid` and every process below it, and wait for `pid`. torchrun starts
    each rank in a session of its own, so a process-group kill would miss them; the launcher is
    stopped first, so that it restarts nothing while its tree is listed."""
    with suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        root.suspend()
        for proc in [*root.children(recursive=True), root]:
            with suppress(psutil.NoSuchProcess):
                proc.kill()
        root.wait()


def run_launch(command: list[str], env: dict[str, str], log_path: Path, timeout: float) -> int | None:
    """Run `command` with its output in `log_path`; its exit code, or None when it ran past
    `timeout` seconds: then it and all its descendants are killed (kill_tree), as on any
    exception here (Ctrl-C), so no rank is left running or waiting."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            return None
        except BaseException:
            kill_tree(proc.pid)
            raise


def error_line(log: str, returncode: int) -> str:
    """The line that says why a point failed: the first `error: ...` line a rank printed (the
    others then stop because a peer failed), else the log's last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith("error: ")), None)
    line = first or (lines[-1] if lines else f"exit code {returncode}")
    return line.removeprefix("error: ")[:300]


def run_point(spec: PointSpec, timeout: float) -> dict[str, Any]:
    """Train the point in a child process (or `spec.processes` under torchrun); its
    measurements, or {"error": one line}."""
    work = Path(tempfile.mkdtemp(prefix="bench-point-"))
    spec = dataclasses.replace(spec, run_dir=str(work / "run"))
    spec_path, result_path, log_path = work / "spec.json", work / "result.json", work / "log.txt"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if spec.processes > 1:  # one compute thread per process, unless the user set it
        env.setdefault("OMP_NUM_THREADS", "1")
    try:
        returncode = run_launch(point_command(spec, spec_path, result_path), env, log_path, timeout)
        if returncode is None:
            return {"error": f"did not finish within --point-timeout {timeout:g} s"}
        if returncode == 0 and result_path.exists():
            return json.loads(result_path.read_text())
        return {"error": error_line(log_path.read_text(errors="replace"), returncode)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def norm_layers(*nets: torch.nn.Module) -> dict[str, int]:
    """How many normalisation layers of each class the networks hold (SyncBatchNorm or
    GlobalBatchNorm2d for statistics over all processes, BatchNorm2d per process)."""
    return dict(Counter(type(m).__name__ for net in nets for m in net.modules()
                        if isinstance(m, torch.nn.modules.batchnorm._NormBase)))


def main(argv: list[str]) -> int:
    """The child (each rank): train the spec's run; rank 0 then writes its timed measurements
    and what the run was (norm, world size, compute threads and the norm layers its networks
    held)."""
    from ..train_loop import train

    def body() -> None:
        spec = PointSpec(**json.loads(Path(argv[0]).read_text()))
        cfg = point_config(spec, device_defaults.device_type())
        trained = train(cfg.validate())
        if rank_and_world()[0] != 0:
            return
        stats = (Path(cfg.run_dir) / "stats.jsonl").read_text().splitlines()
        bf16 = cfg.train.mixed_precision == "bf16"
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        result = {**timed_rows([json.loads(line) for line in stats], spec),
                  "precision": "bf16 autocast" if bf16 else "fp32",
                  "norm": cfg.model.norm, "world_size": world,
                  "threads_per_process": torch.get_num_threads(),
                  "norm_layers": norm_layers(trained.generator, trained.discriminator),
                  "train_config": dataclasses.asdict(cfg.train)}
        atomic_write(Path(argv[1]), json.dumps(result) + "\n")

    try:
        return run_main(body)
    except Exception as exc:  # noqa: BLE001 -- a bug still makes one line in the bench's table
        report_error(f"{type(exc).__name__}: {first_line(exc)}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
