"""The benchmark: one tiny end-to-end run, and its arithmetic checked against numbers derived
independently (FLOPs by hand from the architecture, timings computed by hand).

No timing thresholds here: speed targets live in the benchmark itself (PASS/FAIL on CUDA)."""

from __future__ import annotations

import _thread
import dataclasses
import functools
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from conftest import REPO
from pix2pix_dist.bench import main
from pix2pix_dist.bench.flops import (count_flops, generator_params, peak_bf16_tflops,
                                      step_flops_per_image)
from pix2pix_dist import device_defaults
from pix2pix_dist.bench.measure import LOADERS, median_run, training_rounds
from pix2pix_dist.bench.point import (PointSpec, error_line, point_config, run_launch, run_point,
                                      timed_rows)
from pix2pix_dist.bench.report import SPEED_KEYS, summarize, write_results
from pix2pix_dist.bench.settings import BenchSettings, resolve
from pix2pix_dist.bench.synthetic import ensure_synthetic_shards, make_synthetic_jpegs
from pix2pix_dist.cli import parse
from pix2pix_dist.config import Config

TINY = ["--device", "cpu", "--synthetic", "16", "--batch-size", "4", "--train-batch-size", "2",
        "--batch-sweep", "2", "--crop", "64", "--num-downs", "6", "--ngf", "4", "--ndf", "4",
        "--workers", "2", "--seconds", "0.2", "--warmup", "1", "--steps", "2", "--max-iters", "2",
        "--repeats", "2", "--worker-counts", "1", "--colorize-megapixels", "0.1,0.2"]


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> Path:
    """The folder of TINY's synthetic shards, shared by this module's benchmark runs."""
    return tmp_path_factory.mktemp("bench-cache") / "cache"


@pytest.fixture(scope="module")
def results(tmp_path_factory, synthetic_cache) -> tuple[dict, Path]:
    """One tiny full run: synthetic shards, two training points in two rounds, three loaders at
    1 and 2 workers, colorize at two sizes."""
    root = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the point processes: no thread contention on 2 cores
        rc = main(TINY + ["--cache", str(synthetic_cache), "--output", str(root / "out")])
    assert rc == 0
    files = sorted((root / "out").glob("*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text()), files[0]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory, synthetic_cache) -> tuple[dict, Path]:
    """The training table alone on 2 gloo processes per point, one round: the reference and ours
    with both norms at TINY's sizes; a second sweep batch whose global batch (2 x 9) exceeds
    the 16 images, so that point fails on both ranks."""
    root = tmp_path_factory.mktemp("bench2")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OMP_NUM_THREADS", raising=False)  # the bench's own default: 1 per process
        rc = main(TINY + ["--only", "train", "--processes", "2", "--repeats", "1", "--no-resnet",
                          "--workers", "1", "--batch-sweep", "9", "--cache", str(synthetic_cache),
                          "--output", str(root / "out")])
    assert rc == 0
    [path] = (root / "out").glob("*.json")
    return json.loads(path.read_text()), path


@pytest.mark.slow  # the end-to-end benchmark run (point processes)
def test_results_record_device_versions_command_and_settings(results):
    data, path = results
    env = data["environment"]
    assert env["device_type"] == "cpu" and env["device_name"] and env["cpu_cores"] >= 1
    for name in ("python", "torch", "cuda", "dali", "kornia", "webdataset", "pix2pix_dist"):
        assert name in env["versions"]
    assert "driver" in env and env["versions"]["torch"] == torch.__version__
    assert data["command"].startswith("python -m pix2pix_dist.bench --device cpu")
    assert "--batch-sweep 2" in data["command"]
    assert data["settings"]["crop"] == 64 and data["settings"]["ngf"] == 4
    assert data["date"].endswith("Z")
    md = path.with_suffix(".md").read_text()
    assert "| reference (fp32, NCHW, eager, plain Adam) | unet_64 |" in md and data["command"] in md
    assert "| ours, resnet18-unet | resnet18-unet |" in md
    assert not list(path.parent.glob(".*tmp*"))  # atomic writes leave no temporaries


@pytest.mark.slow  # the end-to-end benchmark run (point processes)
def test_training_points_run_the_real_loop_end_to_end(results):
    data, _ = results
    train = data["train"]
    points = [(p["kind"], p["batch"]) for p in train["points"]]
    # The sweep's 2 is the reference's batch; the resnet18-unet point runs at that batch too.
    assert points == [("reference", 2), ("ours", 2), ("resnet18-unet", 2)]
    for p in train["points"]:
        assert "error" not in p, p.get("error")
        assert p["timed_steps"] == 2 and p["images"] == 2 * p["batch"]
        assert 0 <= p["data_wait_frac"] < 1 and p["images_per_s"] > 0
        assert p["step_images_per_s"] >= p["images_per_s"]
        assert p["bottleneck"] in ("input pipeline", "training step")
        assert p["peak_gpu_mem_gib"] is None and p["mfu"] is None  # CPU: no peak to compare with
    for p in train["points"][:2]:  # two interleaved rounds: two runs each, a spread over them
        assert len(p["runs_images_per_s"]) == 2  # the figure is the lower-middle run's
        assert p["images_per_s"] == min(p["runs_images_per_s"])
        assert p["run_spread"]["min"] <= p["images_per_s"] <= p["run_spread"]["max"]
        assert p["interval_spread"]["min"] <= p["interval_spread"]["max"]
    assert len(train["round_ratios"]) == 2
    spread = data["ratio_spreads"]["ours_over_reference_same_batch"]
    assert spread["rounds"] == 2 and spread["min"] <= data["ratios"][
        "ours_over_reference_same_batch"] <= spread["max"]
    assert len(train["points"][2]["runs_images_per_s"]) == 1  # the resnet point runs once
    ref, ours, resnet = (p["train_config"] for p in train["points"])
    assert {k: resnet[k] for k in SPEED_KEYS} == {k: ours[k] for k in SPEED_KEYS}
    assert (ref["mixed_precision"], ref["channels_last"], ref["fused_adam"]) == ("no", False, False)
    # Ours is exactly what train.py runs on this device: the same resolution of `auto`.
    trains = dataclasses.asdict(device_defaults.resolve(Config(), "cpu").train)
    assert {k: ours[k] for k in SPEED_KEYS} == {k: trains[k] for k in SPEED_KEYS}
    # The FLOPs are the hand-derived count of these networks (see test_step_flops_...).
    assert train["flops_per_image"] == hand_step_flops(64, num_downs=6, ngf=4, ndf=4)
    assert [p["flops_per_image"] for p in train["points"][:2]] == [train["flops_per_image"]] * 2
    unet_params = train["points"][1]["generator_params"]
    assert train["points"][0]["generator_params"] == unet_params
    # The resnet point: its own step, counted the same way, and its own generator.
    resnet_cfg = Config()
    resnet_cfg.model.generator, resnet_cfg.model.encoder_weights = "resnet18-unet", "none"
    resnet_cfg.model.ndf = 4
    resnet_point = train["points"][2]
    assert resnet_point["flops_per_image"] == step_flops_per_image(
        resnet_cfg, Accelerator(cpu=True), 64)
    assert resnet_point["generator_params"] == generator_params(resnet_cfg) > 10 * unet_params
    assert resnet_point["tflop_per_s"] == pytest.approx(
        resnet_point["images_per_s"] * resnet_point["flops_per_image"] / 1e12)
    assert data["highlights"] == {"reference": 2, "ours_same_batch": 2, "ours_best": 2}


@pytest.mark.slow  # the end-to-end benchmark run (point processes)
def test_every_loader_has_a_positive_finite_throughput(results):
    data, _ = results
    assert data["data"]["images"] == 16
    for name in LOADERS:
        entry = data["data"]["loaders"][name]
        assert "error" not in entry, entry.get("error")
        assert math.isfinite(entry["images_per_s"]) and entry["images_per_s"] > 0
        assert entry["images"] == entry["batches"] * 4
        assert len(entry["runs_images_per_s"]) == 2  # two rounds at --workers
    assert [w["workers"] for w in data["data"]["by_workers"]] == [1, 2]  # the scaling curve
    for w in data["data"]["by_workers"]:
        assert all(w["loaders"][name]["images_per_s"] > 0 for name in LOADERS)
    assert [len(v) for v in data["data"]["round_ratios"].values()] == [2, 2]


@pytest.mark.slow  # the end-to-end benchmark run (colorize processes)
def test_colorize_cost_is_measured_per_photo_size(results):
    data, path = results
    photos = data["colorize"]["photos"]
    assert [c["megapixels"] for c in photos] == [0.1, 0.2]
    for c in photos:
        assert c["colorize_s"] > 0 and c["floor_s"] > 0 and c["peak_rss_mib"] > 0
    assert "## Colorize cost against photo size" in path.with_suffix(".md").read_text()


@pytest.mark.slow  # the benchmark's training points, 2 gloo processes each
def test_two_processes_put_both_batchnorm_modes_in_the_training_table(two_process_results):
    data, path = two_process_results
    train = data["train"]
    assert train["processes"] == 2
    points = [(p["kind"], p["batch"], p["norm"]) for p in train["points"]]
    assert points == [("reference", 2, "batch_local"), ("ours", 2, "batch"),
                      ("ours", 2, "batch_local"), ("ours", 9, "batch")]
    ref, glob, local, failed = train["points"]
    layers = sum(ref["norm_layers"].values())
    for p in (ref, glob, local):
        assert "error" not in p, p["error"]
        # What the children ran, as they recorded it: 2 processes, 1 compute thread each, all
        # processes' images counted (2 timed steps x 2 per process x 2 processes).
        assert p["world_size"] == 2 and p["threads_per_process"] == 1
        assert p["images_per_s"] > 0 and p["images"] == 2 * 2 * 2
    # The two modes are different runs: statistics over both processes (our gloo layer), or
    # plain BatchNorm on each; the reference keeps plain BatchNorm per process.
    assert glob["norm_layers"] == {"GlobalBatchNorm2d": layers} and layers > 5
    assert local["norm_layers"] == ref["norm_layers"] == {"BatchNorm2d": layers}
    # The failed point: one line naming the cause, and the run went on to the end.
    assert "\n" not in failed["error"] and "fewer than one global batch of 18" in failed["error"]
    ratio = data["ratios"]["batch_over_batch_local"]
    assert ratio == pytest.approx(glob["images_per_s"] / local["images_per_s"])
    assert data["ratio_spreads"]["batch_over_batch_local"]["rounds"] == 1
    md = path.with_suffix(".md").read_text()
    assert f"- batch_over_batch_local: **{ratio:.2f}x**" in md
    assert "| ours, model.norm=batch (cross-process statistics) | unet_64 |" in md
    assert "| ours, model.norm=batch_local (per-process statistics) | unet_64 |" in md
    assert ("| ours, model.norm=batch (cross-process statistics) | unet_64 | 0.11 | 0.02 | 9 | "
            "skipped: ") in md
    assert "on 2 processes each (batch per process; img/s of all processes)" in md
    assert "the reference keeps plain BatchNorm per process" in md


def test_more_processes_add_batch_local_to_each_interleaved_round():
    s = resolve(BenchSettings(device="cpu", train_batch_size=2, batch_sweep="4", repeats=2,
                              processes=2))
    base = PointSpec(kind="ours", batch=2, shards="", crop=64, load_size=72, num_downs=6, ngf=4,
                     ndf=4, workers=1, warmup=1, steps=2, log_every=1, compile=False, seed=0,
                     run_dir="", processes=2)
    rounds = [[(p.kind, p.batch, p.norm, p.processes) for p in r] for r in training_rounds(s, base)]
    same = [("reference", 2, "batch_local", 2), ("ours", 2, "batch", 2), ("ours", 2, "batch_local", 2)]
    assert rounds == [same, same, [("ours", 4, "batch", 2)], [("resnet18-unet", 2, "batch", 2)]]
    one = training_rounds(dataclasses.replace(s, processes=1), dataclasses.replace(base, processes=1))
    assert [[(p.kind, p.norm) for p in r] for r in one][:2] == [[("reference", "batch_local"),
                                                                 ("ours", "batch")]] * 2
    reference, ours, local = training_rounds(s, base)[0]
    assert [point_config(p, "cpu").model.norm for p in (reference, ours, local)] == [
        "batch_local", "batch", "batch_local"]
    assert point_config(ours, "cpu").train.fused_adam is True
    assert point_config(reference, "cpu").train.fused_adam is False


@pytest.mark.parametrize("end", ["timeout", "ctrl-c"])
def test_a_stopped_point_is_killed_with_every_process_below_it(tmp_path, end):
    """A launcher whose rank runs in a session of its own (as torchrun starts them) and never
    finishes, stopped by the point's timeout or by Ctrl-C (KeyboardInterrupt, raised once both
    have started): both are gone when run_launch returns."""
    pids = tmp_path / "pids"
    script = ("import os, subprocess, sys, time\n"
              "rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
              " start_new_session=True)\n"
              f"open({str(pids)!r} + '.tmp', 'w').write(f'{{os.getpid()}} {{rank.pid}}')\n"
              f"os.replace({str(pids)!r} + '.tmp', {str(pids)!r})\n"
              "time.sleep(600)\n")
    launch = functools.partial(run_launch, [sys.executable, "-c", script], dict(os.environ),
                               tmp_path / "log")
    if end == "timeout":
        assert launch(timeout=3) is None
    else:
        def ctrl_c() -> None:
            while not pids.exists():
                time.sleep(0.05)
            _thread.interrupt_main()

        threading.Thread(target=ctrl_c, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            launch(timeout=600)
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 10  # a reparented rank is reaped by init
        while _running(pid):
            assert time.monotonic() < deadline, f"process {pid} still runs"
            time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_failed_point_says_the_first_ranks_error():
    log = ("W1203 torchrun: Setting OMP_NUM_THREADS\n[rank 1] stopped: another training process "
           "failed or was killed\nerror: [rank 0] no shards in /x\nerror: [rank 1] later\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n=====\n")
    assert error_line(log, 1) == "[rank 0] no shards in /x"
    assert error_line("Traceback\n  File x\nValueError: bad\n\n", 1) == "ValueError: bad"
    assert error_line("", 9) == "exit code 9"


# --- arithmetic against independent numbers ---------------------------------------------------

def conv_flops(cin: int, cout: int, out_hw: int | tuple[int, int]) -> int:
    """Forward FLOPs (2 per multiply-add) of a 4x4 convolution with `out_hw` outputs per channel
    (for a 4x4 stride-2 transposed convolution pass its input size: each input pixel scatters
    one 4x4 kernel per output channel)."""
    h, w = (out_hw, out_hw) if isinstance(out_hw, int) else out_hw
    return 2 * cin * cout * 16 * h * w


def hand_step_flops(size: int, *, num_downs: int, ngf: int, ndf: int) -> int:
    """One pix2pix iteration per image, derived from the architecture (pix2pix's unet and 70x70
    PatchGAN), not from the code: G forward once; D forward on fake and real (D step) and on fake
    (G step); a backward costs a forward for the weight gradients plus one for the input
    gradients, except where no gradient is needed (the first layer's input, never; frozen D's
    weights in the G step)."""
    widths = [ngf * min(2 ** i, 8) for i in range(num_downs)]  # inner width of each U-Net level
    G, G_first = 0, conv_flops(1, widths[0], size // 2)
    for i, inner in enumerate(widths):
        s = size // 2 ** (i + 1)  # the level's inner resolution
        outer_in = 1 if i == 0 else widths[i - 1]
        outer_out = 2 if i == 0 else widths[i - 1]
        up_in = inner if i == num_downs - 1 else 2 * inner  # skip connection concatenated
        G += conv_flops(outer_in, inner, s) + conv_flops(up_in, outer_out, s)
    d = size // 8
    D_layers = [conv_flops(3, ndf, size // 2), conv_flops(ndf, 2 * ndf, size // 4),
                conv_flops(2 * ndf, 4 * ndf, d), conv_flops(4 * ndf, 8 * ndf, d - 1),
                conv_flops(8 * ndf, 1, d - 2)]
    D, D_first = sum(D_layers), D_layers[0]
    g_forward, g_backward = G, 2 * G - G_first
    d_step = 2 * D + 2 * (2 * D - D_first)
    g_step_through_d = D + D  # forward, then input gradients only (D's weights are frozen)
    return g_forward + d_step + g_step_through_d + g_backward


def test_flop_counter_matches_a_hand_count_for_one_convolution():
    conv = torch.nn.Conv2d(3, 5, 4, 2, 1, bias=False)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    forward = 2 * 2 * 5 * 8 * 8 * 3 * 16  # 2 FLOPs x batch x out channels x 8x8 x (3 x 4x4) taps
    assert count_flops(conv, x) == forward
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward  # + input and weight grads


@pytest.mark.parametrize("num_downs,size", [(5, 32), (6, 64)])
def test_step_flops_match_the_hand_derived_count(num_downs, size):
    cfg = Config()
    cfg.model.num_downs, cfg.model.ngf, cfg.model.ndf = num_downs, 4, 4
    cfg.train.mixed_precision = "no"
    counted = step_flops_per_image(cfg, Accelerator(cpu=True), size)
    assert counted == hand_step_flops(size, num_downs=num_downs, ngf=4, ndf=4)


def test_the_default_networks_cost_86_gflop_per_256px_image():
    # The hand count at pix2pix's own size (counting it on a CPU takes ~20 s; the step count
    # equals the hand count at small sizes above).
    assert hand_step_flops(256, num_downs=8, ngf=64, ndf=64) / 1e9 == pytest.approx(86.0, abs=0.05)


def test_timed_rows_add_up_interval_durations():
    spec = PointSpec(kind="ours", batch=4, shards="", crop=64, load_size=72, num_downs=6, ngf=4,
                     ndf=4, workers=1, warmup=2, steps=4, log_every=2, compile=False, seed=0,
                     run_dir="")
    rows = [{"step": 2, "perf/images_per_s": 1.0, "perf/data_wait_frac": 0.9},  # warm-up
            {"step": 4, "perf/images_per_s": 8.0, "perf/data_wait_frac": 0.25},  # 8 img in 1 s
            {"step": 6, "perf/images_per_s": 4.0, "perf/data_wait_frac": 0.5,  # 8 img in 2 s
             "perf/gpu_mem_gib": 3.5}]
    got = timed_rows(rows, spec)
    assert got["images"] == 16 and got["timed_steps"] == 4
    assert got["seconds"] == pytest.approx(3.0)
    assert got["images_per_s"] == pytest.approx(16 / 3)  # not the mean of 8 and 4
    assert got["data_wait_frac"] == pytest.approx(1.25 / 3)  # 0.25 s + 1 s of 3 s
    assert got["step_images_per_s"] == pytest.approx(16 / 1.75)
    assert got["peak_gpu_mem_gib"] == 3.5


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("NVIDIA L40S", 362.0), ("NVIDIA GeForce GTX 1080", None)])
def test_peak_table_by_device_name(name, peak):
    assert peak_bf16_tflops(name) == peak


def _hand_results(ref: float, same: float, best: float, device: str = "cuda",
                  round_ratios: list[float] | None = None, processes: int = 1) -> dict:
    points = [{"kind": "reference", "batch": 16, "images_per_s": ref},
              {"kind": "ours", "batch": 16, "images_per_s": same},
              {"kind": "ours", "batch": 256, "images_per_s": best},
              {"kind": "ours", "batch": 512, "error": "CUDA out of memory"}]
    results = {"environment": {"device_type": device},
               "settings": {"train_batch_size": 16, "crop": 256, "num_downs": 8, "ngf": 64, "ndf": 64,
                            "processes": processes},
               "train": {"points": points, "round_ratios": round_ratios},
               "data": {"loaders": {"dali": {"images_per_s": 21_000.0},
                                    "tutorial": {"images_per_s": 700.0}}}}
    summarize(results)
    return results


def test_side_by_side_ratios_are_the_median_round_with_its_spread():
    r = _hand_results(ref=870.0, same=4350.0, best=5220.0, round_ratios=[5.5, 4.0, 4.5])
    assert r["ratios"]["ours_over_reference_same_batch"] == pytest.approx(4.5)
    assert r["ratio_spreads"]["ours_over_reference_same_batch"] == {"min": 4.0, "max": 5.5,
                                                                    "rounds": 3}
    assert r["ratios"]["ours_best_over_reference"] == pytest.approx(6.0)  # medians' ratio
    assert median_run([{"images_per_s": 3.0, "id": "a"}, {"images_per_s": 1.0, "id": "b"},
                       {"images_per_s": 2.0, "id": "c"}])["id"] == "c"


def test_speed_ups_and_verdicts_from_hand_made_numbers():
    r = _hand_results(ref=870.0, same=4350.0, best=5220.0)
    assert r["highlights"] == {"reference": 16, "ours_same_batch": 16, "ours_best": 256}
    assert r["ratios"]["ours_over_reference_same_batch"] == pytest.approx(5.0)
    assert r["ratios"]["ours_best_over_reference"] == pytest.approx(6.0)
    assert r["ratios"]["dali_over_tutorial"] == pytest.approx(30.0)
    assert r["ratios"]["dali_over_ours_best"] == pytest.approx(21_000 / 5220)
    t = r["targets"]
    assert [t[k]["verdict"] for k in ("dali_images_per_s", "end_to_end_images_per_s",
                                      "ours_over_reference_batch_16")] == ["PASS", "PASS", "PASS"]
    slow = _hand_results(ref=870.0, same=2500.0, best=3240.0)["targets"]
    assert slow["end_to_end_images_per_s"]["verdict"] == "FAIL"
    assert slow["ours_over_reference_batch_16"]["verdict"] == "FAIL"
    cpu = _hand_results(ref=1.0, same=2.0, best=9000.0, device="cpu")["targets"]
    assert cpu["end_to_end_images_per_s"]["verdict"] is None  # judged only where defined
    eight = _hand_results(ref=870.0, same=4350.0, best=40_000.0, processes=8)["targets"]
    assert eight["end_to_end_images_per_s"]["verdict"] is None  # defined for one GPU


@pytest.mark.parametrize("device_type,device_name,ignored", [
    ("cpu", "Intel(R) Xeon(R) Platinum 8480+", True), ("cuda", "NVIDIA H100 80GB HBM3", False)])
def test_cpu_results_are_git_ignored_gpu_results_are_not(tmp_path, device_type, device_name,
                                                         ignored):
    results = {"date": "2026-01-02T03:04:05Z", "command": "python -m pix2pix_dist.bench",
               "environment": {"device_type": device_type, "device_name": device_name,
                               "cpu_model": "x", "cpu_cores": 2, "versions": {}},
               "settings": {"train_batch_size": 16, "crop": 256, "num_downs": 8, "ngf": 64,
                            "ndf": 64, "batch_size": 8, "workers": 2}}
    summarize(results)
    paths = write_results(results, tmp_path)
    assert paths[0].name.startswith("20260102T030405Z-" + ("cpu-" if ignored else "nvidia-h100"))
    for path in paths:
        check = subprocess.run(["git", "check-ignore", "--no-index", "-q",
                                f"benchmarks/results/{path.name}"], cwd=REPO)
        assert check.returncode == (0 if ignored else 1), path.name


def test_sweep_starts_at_the_reference_batch_without_repeats():
    s = resolve(BenchSettings(device="cpu", train_batch_size=16, batch_sweep="64, 16,128,64"))
    assert s.sweep() == [16, 64, 128]
    assert resolve(BenchSettings(device="cpu")).sweep() == [2, 1, 4]  # CPU default
    s = resolve(BenchSettings(device="cpu", workers=3, worker_counts="4,1"))
    assert s.worker_sweep() == [1, 3, 4]  # --workers is always on the curve


@pytest.mark.gpu
def test_gpu_points_report_memory_and_mfu(tmp_path):
    rc = main(["--device", "cuda", "--only", "train", "--synthetic", "64", "--crop", "128",
               "--num-downs", "7", "--train-batch-size", "8", "--batch-sweep", "32",
               "--warmup", "2", "--steps", "4", "--cache", str(tmp_path / "cache"),
               "--output", str(tmp_path / "out")])
    assert rc == 0
    [path] = (tmp_path / "out").glob("*.json")
    data = json.loads(path.read_text())
    assert data["environment"]["driver"] and data["environment"]["versions"]["cudnn"]
    points = data["train"]["points"]
    assert [(p["kind"], p["batch"]) for p in points] == [("reference", 8), ("ours", 8), ("ours", 32),
                                                      ("resnet18-unet", 8)]
    for p in points:
        assert "error" not in p, p.get("error")
        assert p["peak_gpu_mem_gib"] > 0
        assert (p["mfu"] is None) == (data["train"]["peak_bf16_tflops"] is None)
    assert points[0]["precision"] == "fp32" and points[1]["precision"] == "bf16 autocast"
    assert points[2]["peak_gpu_mem_gib"] > points[1]["peak_gpu_mem_gib"]


def test_gpu_check_script_dry_run_names_valid_bounded_steps():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert [name.split()[0] for name in steps] == ["gpu-tests", "bench", "sample-shards", "demo"]
    limits = [int(name.split("limit ")[1].rstrip("s)")) for name in steps]
    assert sum(limits) <= 360  # fits a session's device time with start-up and staging
    commands = list(steps.values())
    # The gpu-marked tests and the speed-path tests that run on CUDA when it is there.
    assert "-m pytest -q" in commands[0] and "tests/test_training_gpu.py" in commands[0]
    assert "tests/test_data_gpu.py" in commands[0]
    bench = shlex.split(commands[1])
    assert bench[1:3] == ["-m", "pix2pix_dist.bench"] and "--compile" in bench
    settings = resolve(parse(BenchSettings, bench[3:], prog="bench", description=""))
    assert settings.compile and settings.output == "benchmarks/results"
    assert "-m pix2pix_dist.shards --source sample --output shards/sample" in commands[2]
    assert "train.py --preset gpu-demo" in commands[3]


# --- command line and data -------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--crop", "100", "--num-downs", "6"], "divisible"),
    (["--batch-sweep", "16,x"], "--batch-sweep '16,x'"),
    (["--batch-sweep", "0"], "at least 1"),
    (["--processes", "0"], "--processes must be at least 1"),
    (["--only", "everything"], "everything"),
    (["--no-such-option", "1"], "no-such-option"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    assert main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "1,a"], "--sizes takes positive megapixels"),
    (["--set-sizes", "0"], "--set-sizes takes positive megapixels"),
    (["--format", "gif"], "gif"),
])
def test_colorize_speed_bad_options_are_one_line_errors(argv, message, tmp_path, capsys):
    from pix2pix_dist.bench import colorize_speed

    assert colorize_speed.main([*argv, "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not any(tmp_path.iterdir())  # refused before any photo or export is made


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--batch-sweep" in out and "--train-batch-size" in out and "reference" in out


def test_synthetic_images_are_distinct_640x480_jpegs(tmp_path):
    paths = make_synthetic_jpegs(tmp_path, 12, seed=0, workers=2)
    assert len(paths) == 12
    digests = set()
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (640, 480) and im.mode == "RGB"
        digests.add(hashlib.sha256(p.read_bytes()).hexdigest())
    assert len(digests) == 12
    # Deterministic: the same seed gives the same bytes.
    again = make_synthetic_jpegs(tmp_path / "again", 2, seed=0, workers=1)
    assert again[1].read_bytes() == paths[1].read_bytes()


def test_synthetic_shards_are_reused(tmp_path, capsys):
    cache = tmp_path / "cache"
    ensure_synthetic_shards(cache, 9, seed=0, workers=1)
    mtime = (cache / "manifest.json").stat().st_mtime_ns
    ensure_synthetic_shards(cache, 9, seed=0, workers=1)
    assert (cache / "manifest.json").stat().st_mtime_ns == mtime
    assert "reusing" in capsys.readouterr().out


def test_bad_shards_path_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for where in ("missing", "empty"):
        rc = main(["--device", "cpu", "--only", "data", "--shards", str(tmp_path / where),
                   "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: --shards")
    assert not (tmp_path / "out").exists()


def test_foreign_cache_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    rc = main(["--device", "cpu", "--only", "data", "--synthetic", "4",
               "--cache", str(tmp_path), "--output", str(tmp_path / "out")])
    assert rc == 2 and "not written by the benchmark" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
