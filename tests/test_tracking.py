"""RunTracker against real trackers: an offline wandb run read back from its .wandb file,
tensorboard event files, and the tracker-independent stats.jsonl and sample PNGs."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from pix2pix_dist.config import ConfigError
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image

from pix2pix_dist.config import Config
from pix2pix_dist.recipe import resolve_recipe
from pix2pix_dist.tracking import GRID_PADDING, RunTracker, _wandb_credentials_configured, tracker_for
from wandb_records import find_run_file, history_rows, read_records

N, H, W = 2, 16, 24  # samples in a grid, tile size


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No credentials, no user wandb settings, and fresh Accelerate/wandb singletons."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL",
                "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    if "wandb" in sys.modules:  # wandb caches settings read from the environment
        sys.modules["wandb"].teardown()


def make_tracker(run_dir: Path, kind: str, resume_step: int = 0) -> RunTracker:
    cfg = Config()
    cfg.log.tracker = kind
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, log_with=tracker_for(cfg), project_dir=str(run_dir))
    # The default recipe (global batch 16) on 2 processes over 64 images: 8/process, 400 steps.
    recipe = resolve_recipe(cfg, 2, train_images=64)
    return RunTracker(accelerator, cfg, run_dir, resume_step=resume_step, recipe=recipe)


# What the tracker's run config holds beyond the config as given (data.batch_size=0, "derived").
RESOLVED = {"data.batch_size": 0, "train.steps": 0, "recipe.world_size": 2,
            "recipe.global_batch": 16, "recipe.batch_per_process": 8, "recipe.steps": 400,
            "recipe.lr": 2e-4}


def sample_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constant tiles: gray 0.5, prediction red, truth blue, so positions can be checked."""
    gray = torch.full((N, 1, H, W), 0.5)
    pred = torch.zeros(N, 3, H, W)
    pred[:, 0] = 1.0
    truth = torch.zeros(N, 3, H, W)
    truth[:, 2] = 1.0
    return gray, pred, truth


def stats_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def check_grid(path: Path) -> np.ndarray:
    """The PNG has one row per sample and three columns, with the tiles in order."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (N * (H + GRID_PADDING) + GRID_PADDING,
                            3 * (W + GRID_PADDING) + GRID_PADDING, 3)
    for row in range(N):
        y = GRID_PADDING + row * (H + GRID_PADDING) + H // 2
        centers = [GRID_PADDING + col * (W + GRID_PADDING) + W // 2 for col in range(3)]
        assert [tuple(pixels[y, x]) for x in centers] == [(128, 128, 128), (255, 0, 0), (0, 0, 255)]
    return pixels


def test_wandb_offline_run_without_credentials(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, "wandb")
    assert "wandb sync" in capsys.readouterr().out
    losses = {10: 1.5, 20: 0.75, 30: 0.25}
    for step, loss in losses.items():
        tracker.log_scalars(step, {"loss_g": loss, "loss_d": torch.tensor(loss / 2)})
    png = tracker.log_grid(30, *sample_batch())
    tracker.close()

    run_file = find_run_file(run_dir)  # offline-run-*: offline was chosen automatically
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"
    rows = {row["_step"]: row for row in history_rows(run_file)}
    assert {step: rows[step]["loss_g"] for step in losses} == losses
    assert {step: rows[step]["loss_d"] for step in losses} == {s: v / 2 for s, v in losses.items()}
    assert rows[30]["samples/_type"] == "image-file"
    assert rows[30]["samples/path"].startswith("media/images/")
    media = run_file.parent / "files" / rows[30]["samples/path"]
    # wandb got the same pixels as the PNG (a float [0, 1] array would have come out black).
    assert np.array_equal(np.asarray(Image.open(media).convert("RGB")), check_grid(png))

    configs = [r.config for r in read_records(run_file) if r.WhichOneof("record_type") == "config"]
    sent = {item.key: json.loads(item.value_json) for c in configs for item in c.update}
    assert {key: sent[key] for key in RESOLVED} == RESOLVED

    assert png == run_dir / "samples" / "step-000030.png"
    assert (run_dir / "samples" / "latest.png").read_bytes() == png.read_bytes()
    lines = stats_lines(run_dir)
    assert [(x["step"], x["loss_g"], x["loss_d"]) for x in lines] == [
        (s, v, v / 2) for s, v in losses.items()]
    assert all(isinstance(x["time"], float) for x in lines)


def test_resume_truncates_stats_and_continues_the_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, "wandb")
    for step in (10, 20, 30, 40):
        tracker.log_scalars(step, {"loss": float(step)})
    tracker.close()
    first_id = (run_dir / "wandb_run_id.txt").read_text()
    with open(run_dir / "stats.jsonl", "a") as f:
        f.write('{"step": 50, "lo')  # a line torn by a crash

    tracker = make_tracker(run_dir, "wandb", resume_step=20)
    assert [x["step"] for x in stats_lines(run_dir)] == [10, 20]
    tracker.log_scalars(30, {"loss": 3.0})
    tracker.close()
    assert [(x["step"], x["loss"]) for x in stats_lines(run_dir)] == [
        (10, 10.0), (20, 20.0), (30, 3.0)]
    assert (run_dir / "wandb_run_id.txt").read_text() == first_id
    run_files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and {f.name for f in run_files} == {f"run-{first_id.strip()}.wandb"}
    assert [row["loss"] for row in history_rows(find_run_file(run_dir))] == [3.0]

    make_tracker(run_dir, "wandb", resume_step=0).close()  # a fresh start is a new wandb run
    assert (run_dir / "wandb_run_id.txt").read_text() != first_id
    assert stats_lines(run_dir) == []


def test_reader_follows_records_across_blocks(tmp_path):
    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, "wandb")
    steps = range(1, 401)
    for step in steps:
        tracker.log_scalars(step, {"loss": step / 7, "lr": 2e-4})
    tracker.close()
    run_file = find_run_file(run_dir)
    assert run_file.stat().st_size > 2 * 32 * 1024  # several blocks, so records are split
    rows = history_rows(run_file)
    assert [(r["_step"], r["loss"]) for r in rows] == [(s, s / 7) for s in steps]


def test_tracker_none_writes_stats_and_png_only(tmp_path):
    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, "none")
    tracker.log_scalars(5, {"loss": 0.5})
    check_grid(tracker.log_grid(5, *sample_batch()))
    tracker.close()
    assert stats_lines(run_dir)[0]["loss"] == 0.5
    assert sorted(p.name for p in run_dir.iterdir()) == ["samples", "stats.jsonl"]


def test_tensorboard_writes_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, "tensorboard")
    tracker.log_scalars(1, {"loss": 2.0})
    tracker.log_scalars(2, {"loss": 1.0})
    tracker.log_grid(2, *sample_batch())
    tracker.close()
    events = EventAccumulator(str(run_dir / "tensorboard" / Config().log.project)).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.0)]
    image = events.Images("samples")[0]
    assert (image.step, image.height, image.width) == (
        2, N * (H + GRID_PADDING) + GRID_PADDING, 3 * (W + GRID_PADDING) + GRID_PADDING)
    assert not (run_dir / "wandb").exists()
    [hparams_file] = (run_dir / "tensorboard" / Config().log.project).glob("*/hparams.yml")
    hparams = yaml.safe_load(hparams_file.read_text())
    assert {key: hparams[key] for key in RESOLVED} == RESOLVED


def test_online_mode_without_credentials_refuses_instead_of_prompting(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match="no W&B credentials"):
        make_tracker(tmp_path / "run", "wandb")


def test_credentials_from_env_or_netrc(tmp_path, monkeypatch):
    assert not _wandb_credentials_configured()
    netrc = Path(tmp_path / "home" / ".netrc")
    netrc.write_text("machine example.com login user password secret\n")
    assert not _wandb_credentials_configured()
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert _wandb_credentials_configured()
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert _wandb_credentials_configured()


def test_non_main_process_does_nothing(tmp_path):
    accelerator = types.SimpleNamespace(is_main_process=False)  # any tracker call would fail
    recipe = resolve_recipe(Config(), 1, train_images=64)
    tracker = RunTracker(accelerator, Config(), tmp_path / "run", resume_step=0, recipe=recipe)
    tracker.log_scalars(1, {"loss": 1.0})
    tracker.log_grid(1, *sample_batch())
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_close_leaves_the_process_group_to_the_caller(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    try:
        make_tracker(tmp_path / "run", "none").close()
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name", ["stats.jsonl", "wandb_run_id.txt"])
def test_a_fifo_in_the_run_folder_is_refused_never_opened(tmp_path, name):
    """open() of a FIFO blocks: the tracker's files are checked to be regular files first."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / name)
    for resume_step in (0, 20):  # a fresh run appends to stats.jsonl; a resumed one reads both
        if name == "wandb_run_id.txt" and resume_step == 0:
            continue  # a fresh run replaces the id file (atomic rename), never reads it
        with pytest.raises(OSError, match="not a regular file"):
            # wandb only where the id is read (before wandb starts): no run is left open
            tracker = make_tracker(run_dir, "wandb" if name == "wandb_run_id.txt" else "none",
                                   resume_step=resume_step)
            tracker.log_scalars(30, {"loss": 3.0})
