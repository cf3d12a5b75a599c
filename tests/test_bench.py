"""The benchmark runs end to end on tiny settings and records what it measured.

No timing thresholds here: speed targets live in the benchmark itself (PASS/FAIL on CUDA).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from pix2pix_dist.bench import main
from pix2pix_dist.bench.measure import LOADERS
from pix2pix_dist.bench.synthetic import ensure_synthetic_shards, make_synthetic_jpegs

TINY = ["--device", "cpu", "--synthetic", "16", "--batch-size", "4", "--train-batch-size", "2",
        "--crop", "64", "--num-downs", "6", "--workers", "2", "--seconds", "0.2",
        "--warmup", "1", "--max-iters", "2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, Path]:
    """One tiny full run (synthetic shards, three loaders, eager training step)."""
    root = tmp_path_factory.mktemp("bench")
    rc = main(TINY + ["--cache", str(root / "cache"), "--output", str(root / "out")])
    assert rc == 0
    files = sorted((root / "out").glob("*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text()), files[0]


def test_results_record_device_versions_and_settings(results):
    data, path = results
    env = data["environment"]
    assert env["device_type"] == "cpu" and env["device_name"] and env["cpu_cores"] >= 1
    for name in ("python", "torch", "torchvision", "cuda", "dali", "kornia", "webdataset",
                 "pix2pix_dist"):
        assert name in env["versions"]
    assert env["versions"]["torch"] and env["versions"]["pix2pix_dist"]
    assert data["settings"]["crop"] == 64 and data["settings"]["num_downs"] == 6
    assert data["date"].endswith("Z")
    assert path.with_suffix(".md").exists()
    assert not list(path.parent.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_every_loader_has_a_positive_finite_throughput(results):
    data, _ = results
    assert data["data"]["images"] == 16
    for name in LOADERS:
        entry = data["data"]["loaders"][name]
        assert "error" not in entry, entry.get("error")
        assert math.isfinite(entry["images_per_s"]) and entry["images_per_s"] > 0
        assert entry["images"] == entry["batches"] * 4
        assert entry["images_per_s"] == pytest.approx(entry["images"] / entry["seconds"])


def test_ratios_match_the_measurements(results):
    data, _ = results
    loaders, ratios = data["data"]["loaders"], data["ratios"]
    assert ratios["dali_over_tutorial"] == pytest.approx(
        loaders["dali"]["images_per_s"] / loaders["tutorial"]["images_per_s"])
    assert ratios["torch_over_tutorial"] == pytest.approx(
        loaders["torch"]["images_per_s"] / loaders["tutorial"]["images_per_s"])
    assert ratios["compile_over_eager"] is None  # no --compile
    assert data["target"]["verdict"] is None  # judged only on CUDA


def test_training_step_numbers_are_consistent(results):
    data, _ = results
    eager = data["train"]["eager"]
    assert eager["images_per_s"] > 0 and math.isfinite(eager["images_per_s"])
    assert eager["ms_per_step"] == pytest.approx(1000 * 2 / eager["images_per_s"])
    assert eager["gflop_per_image"] == pytest.approx(86.0 / 16)  # (64/256)^2 of unet_256
    assert eager["tflop_per_s"] == pytest.approx(eager["images_per_s"] * 86.0 / 16 / 1000)
    assert eager["peak_gpu_mem_gib"] is None


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


def test_bad_crop_is_rejected(capsys):
    assert main(["--device", "cpu", "--crop", "100", "--num-downs", "6"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_foreign_cache_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    rc = main(["--device", "cpu", "--only", "data", "--synthetic", "4",
               "--cache", str(tmp_path), "--output", str(tmp_path / "out")])
    assert rc == 2 and "not written by the benchmark" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
