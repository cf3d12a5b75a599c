"""Recipes in global terms: derivation per world size, schedule, lr scaling, --dry-run, the
square geometry on both backends, and resume across world sizes with real gloo processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from accelerate import Accelerator
from torchvision.io import decode_jpeg

from batchnorm_worker import two_steps
from conftest import REPO, clean_env, free_port, run_python
from pix2pix_dist.config import ConfigError, build_config, parse_command
from pix2pix_dist.data import build_loader
from pix2pix_dist.data.lab import uint8_to_lab
from pix2pix_dist.data.shards_index import find_shards
from pix2pix_dist.recipe import resolve_recipe
from pix2pix_dist.train_loop import main
from test_data import one_photo_shard, write_shards


@pytest.mark.parametrize("world, per_process", [(1, 16), (2, 8), (8, 2)])
def test_tutorial_is_global_batch_16_for_100_epochs_on_any_world_size(world, per_process):
    recipe = resolve_recipe(build_config("tutorial"), world, train_images=8000)
    assert (recipe.global_batch, recipe.batch_per_process) == (16, per_process)
    assert (recipe.steps_per_epoch, recipe.steps, recipe.epochs) == (500, 50_000, 100)
    assert recipe.lr == 2e-4 and recipe.decay_steps == 0
    assert {recipe.lr_factor(s) for s in (0, 1, 25_000, 49_998, 49_999)} == {1.0}  # constant


@pytest.mark.parametrize("preset, world, words", [
    ("tutorial", 8, "BatchNorm over the global batch (16 images, cross-process)"),
    ("tutorial", 1, "BatchNorm over the batch (16 images)"),
    ("coco", 8, "BatchNorm per process (64 images each; model.norm=batch_local, not the global "
                "batch of 512)"),
    ("cpu-demo", 2, "BatchNorm over the global batch (4 images, cross-process)")])
def test_the_recipe_line_says_whose_images_batchnorm_sees(preset, world, words):
    assert resolve_recipe(build_config(preset), world, train_images=118_000).describe().endswith(
        "; " + words)


def test_paper_decays_over_its_second_half_to_exactly_zero():
    recipe = resolve_recipe(build_config("paper"), 1, train_images=400)  # facades: 400 images
    assert (recipe.global_batch, recipe.steps, recipe.epochs, recipe.decay_steps) == (1, 80_000, 200, 40_000)
    assert recipe.lr_factor(0) == recipe.lr_factor(39_999) == 1.0  # 100 epochs constant
    assert recipe.lr_factor(40_000) == pytest.approx(39_999 / 40_000)
    assert recipe.lr_factor(60_000) == pytest.approx(19_999 / 40_000)
    assert recipe.lr_factor(79_999) == 0.0  # the last update


def test_short_schedule_by_hand():
    cfg = parse_command(["train.steps=10", "optim.decay_fraction=0.5"])[0]
    recipe = resolve_recipe(cfg, 1, train_images=100)
    assert [recipe.lr_factor(s) for s in range(10)] == pytest.approx(
        [1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0])


@pytest.mark.parametrize("preset, world, nearest", [("tutorial", 3, "15 or 18"), ("tutorial", 32, "32"),
                                                    ("paper", 8, "8"), ("cpu-demo", 3, "3 or 6")])
def test_global_batch_the_world_does_not_divide_names_the_nearest_sizes(preset, world, nearest):
    with pytest.raises(ConfigError) as err:
        resolve_recipe(build_config(preset), world, train_images=8000)
    message = str(err.value)
    assert f"is not divisible by {world} processes; nearest valid sizes: {nearest} " in message
    assert message.startswith("data.global_batch=") and "\n" not in message


def test_pinned_per_process_batch_makes_the_global_batch():
    cfg = parse_command(["--preset", "tutorial", "data.batch_size=4"])[0]
    recipe = resolve_recipe(cfg, 8, train_images=8000)
    assert (recipe.global_batch, recipe.batch_per_process, recipe.steps_per_epoch) == (32, 4, 250)
    assert (recipe.steps, recipe.lr) == (25_000, 2e-4)  # still 100 epochs; lr_scaling=none


@pytest.mark.parametrize("rule, lr", [("none", 2e-4), ("linear", 8e-4), ("sqrt", 4e-4)])
def test_lr_scaling_is_relative_to_the_reference_batch(rule, lr):
    cfg = parse_command(["--preset", "tutorial", "data.global_batch=64", f"optim.lr_scaling={rule}"])[0]
    recipe = resolve_recipe(cfg, 4, train_images=8000)
    assert recipe.lr == pytest.approx(lr)
    assert f"reference batch 16, lr_scaling={rule}" in recipe.describe()


def test_too_small_train_split_is_one_line():
    with pytest.raises(ConfigError, match="the train split has 9 images, fewer than one global batch of 16"):
        resolve_recipe(build_config("tutorial"), 1, train_images=9)


@pytest.fixture(scope="module")
def shards_32(tmp_path_factory) -> Path:
    """32 train samples, all undecodable: a dry run must count them without reading one."""
    out = tmp_path_factory.mktemp("recipe_shards")
    return write_shards(out, "train", 32, per_shard=16, corrupt=tuple(range(32)))


@pytest.mark.parametrize("world, line", [
    ("1", "recipe: global batch 16 = 16/process x 1 process(es); 200 steps = 100 epochs of 32 "
          "train images (2 steps/epoch); lr 0.0002 (optim.lr 0.0002 at reference batch 16, "
          "lr_scaling=none); constant lr"),
    ("2", "recipe: global batch 16 = 8/process x 2 process(es); 200 steps = 100 epochs"),
])
def test_dry_run_prints_the_recipe_and_builds_nothing(shards_32, tmp_path, monkeypatch, capsys, world, line):
    monkeypatch.setenv("WORLD_SIZE", world)
    run_dir = tmp_path / "run"
    assert main(["--preset", "tutorial", f"data.shards={shards_32}", f"run_dir={run_dir}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert line in out and "dry run: nothing was built or trained" in out
    assert not run_dir.exists()


def test_dry_run_with_a_decay_and_a_bad_world_size(shards_32, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--preset", "paper", f"data.shards={shards_32}", "data.global_batch=4",
                 "optim.lr_scaling=linear", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("global batch 4 = 2/process x 2 process(es); 1600 steps = 200 epochs of 32 train images "
            "(8 steps/epoch); lr 0.0008 (optim.lr 0.0002 at reference batch 1, lr_scaling=linear: x 4); "
            "constant lr for 800 steps, then linear decay to 0 over the last 800") in out
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--preset", "tutorial", f"data.shards={shards_32}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1  # "[rank 0] " when launched
    assert err.endswith("data.global_batch=16 is not divisible by 3 processes; nearest valid "
                        "sizes: 15 or 18 (or pin the per-process batch with data.batch_size)\n")


@pytest.mark.parametrize("world", ["0", "abc", "-2", ""])
def test_dry_run_with_a_nonsense_world_size_is_one_line(shards_32, monkeypatch, capsys, world):
    monkeypatch.setenv("WORLD_SIZE", world)
    assert main(["--preset", "tutorial", f"data.shards={shards_32}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: RANK='0' and WORLD_SIZE={world!r} must be whole numbers with "
                   f"0 <= RANK < WORLD_SIZE\n")


def _stripes(height: int, width: int) -> torch.Tensor:
    """uint8 (3,H,W): red, green and blue thirds from left to right."""
    img = torch.zeros(3, height, width, dtype=torch.uint8)
    for channel in range(3):
        img[channel, :, channel * width // 3:(channel + 1) * width // 3] = 220
    return img


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("train", [False, True])
def test_square_resize_squashes_the_whole_image_on_both_backends(tmp_path, backend, train, device):
    jpg = one_photo_shard(tmp_path, _stripes(48, 144).permute(1, 2, 0).numpy(), quality=98)
    cfg = parse_command([f"data.shards={tmp_path}", f"data.backend={backend}", "data.batch_size=4",
                      "data.resize=square", "data.load_size=32", "data.crop_size=32",
                      "model.num_downs=5", "data.flip=false", "data.num_threads=1"])[0].data
    L, ab = next(iter(build_loader(find_shards(tmp_path, "train"), cfg, batch_size=4, rank=0,
                                   world_size=1, device=torch.device(device), seed=0, train=train)))
    L, ab = L.cpu(), ab.cpu()  # on CUDA: GPU decode and resize, compared with the CPU reference
    decoded = decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8))
    squash = TF.resize(decoded, [32, 32], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    centre = TF.center_crop(TF.resize(decoded, [32], antialias=True), [32, 32])  # shorter_side
    want_L, want_ab = uint8_to_lab(squash[None])
    crop_L, crop_ab = uint8_to_lab(centre[None])
    for i in range(4):
        assert (ab[i] - want_ab[0]).abs().mean() < 0.02 and (L[i] - want_L[0]).abs().mean() < 0.02
    assert (ab[0] - crop_ab[0]).abs().mean() > 0.2  # not the green centre of shorter_side



@pytest.mark.slow
def test_resume_on_another_world_size_keeps_the_global_batch_or_refuses(tmp_path):
    """The tutorial on 2 gloo processes (8 per process), resumed mid-run on 1 process (16 per
    process): same global batch, same schedule. A pinned per-process batch that changes the
    global batch is refused."""
    shards = write_shards(tmp_path / "shards", "train", 16, per_shard=8)
    run_dir = tmp_path / "run"
    args = ["train.py", "--preset", "tutorial", f"data.shards={shards}", f"run_dir={run_dir}",
            "data.load_size=32", "data.crop_size=32", "model.num_downs=5", "model.ngf=8",
            "model.ndf=8", "data.num_threads=1", "data.shuffle_buffer=8", "log.sample_count=2",
            "train.mixed_precision=no", "log.tracker=none", "log.every=10", "log.sample_every=1000",
            "ckpt.every=90", "ckpt.keep=5", "optim.decay_fraction=0.5"]
    accelerate = Path(sys.executable).with_name("accelerate")
    two = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", str(free_port()), *args],
                         cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    assert two.returncode == 0, two.stderr[-3000:]
    assert ("recipe: global batch 16 = 8/process x 2 process(es); 100 steps = 100 epochs of 16 "
            "train images (1 steps/epoch)") in two.stdout
    assert "done: 100 steps" in two.stdout
    first = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == list(range(10, 101, 10))
    assert first[-1]["lr"] == 0.0 and first[4]["lr"] == 2e-4  # steps 50: constant; 100: zero

    shutil.rmtree(run_dir / "checkpoints" / "step-00000100")  # as if stopped after step 90
    one = run_python(args)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "at step 90" in one.stdout and "done: 100 steps" in one.stdout
    assert "recipe: global batch 16 = 16/process x 1 process(es); 100 steps = 100 epochs" in one.stdout
    again = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [r["step"] for r in first]
    assert [r["lr"] for r in again] == [r["lr"] for r in first]  # the same schedule

    pinned = run_python([*args, "data.batch_size=4"])
    assert pinned.returncode == 2 and "Traceback" not in pinned.stderr
    assert pinned.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir / 'checkpoints' / 'step-00000100'} was trained with a global batch of 16, "
        f"this run's is 4 (4/process x 1); resuming would change the recipe. Set "
        f"data.global_batch=16 without data.batch_size, or use a new run_dir")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() else float((a - b).norm())


@pytest.mark.slow  # two gloo processes, and unet_256 at 256x256
def test_batchnorm_covers_the_global_batch_on_two_processes(tmp_path):
    """The tutorial's first steps from 1 process x 16 images and from 2 gloo processes x 8:
    with model.norm=batch the gradients and the weights after 2 steps are the same; with
    per-process statistics (batch_local) they are not (the images of the two halves differ)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "tests/batchnorm_worker.py",
         str(tmp_path)], cwd=REPO, env=clean_env(PYTHONPATH=f"{REPO}:{REPO / 'tests'}"),
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [view["world"] for view in ranks] == [2, 2]
    one = two_steps(Accelerator(cpu=True), "batch")  # 1 process: plain BatchNorm over 16

    def worst(view: dict, what: str) -> float:
        return max(_relative(view[what][k], one[what][k])
                   for k in one[what] if one[what][k].is_floating_point())

    for rank in ranks:
        glob, local = rank["batch"], rank["batch_local"]
        assert glob["grads"].keys() == one["grads"].keys() and len(one["grads"]) > 20
        assert worst(glob, "grads") < 1e-5 and worst(glob, "state") < 1e-5  # buffers included
        assert worst(local, "grads") > 1e-2 and worst(local, "state") > 1e-2
        # the weights moved: the comparison after 2 steps is not of the initial weights
        assert all(not torch.equal(glob["state"][k], glob["init"][k]) for k in glob["grads"])
    # Global statistics: both ranks hold the same running statistics (D's are not broadcast).
    assert all(torch.equal(ranks[0]["batch"]["state"][k], ranks[1]["batch"]["state"][k])
               for k in one["state"])
