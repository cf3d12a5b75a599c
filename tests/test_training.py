"""End-to-end training on real shards: outputs, tracking, resume, DDP, failure handling.

Every run is a subprocess started the way users start it (`python train.py ...` or
`accelerate launch`), so each has a fresh Accelerate state and real signal handling."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, clean_env, free_port, run_python
from pix2pix_dist.checkpoints import list_checkpoints
from pix2pix_dist.export import load_export
from wandb_records import find_run_file, history_rows, read_records

pytestmark = pytest.mark.slow  # every test here trains end to end in subprocesses

TINY = ["data.load_size=64", "data.crop_size=64", "model.num_downs=6", "model.ngf=16",
        "model.ndf=16", "data.batch_size=2", "data.num_threads=1", "data.shuffle_buffer=16",
        "log.sample_count=2", "train.mixed_precision=no"]


def stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_run(sample_shards, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A short run on the sample photos with the wandb tracker (offline: no credentials)."""
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    home = tmp_path_factory.mktemp("home")  # no ~/.netrc: wandb must go offline by itself
    proc = run_python(["train.py", *TINY, f"data.shards={sample_shards}", f"run_dir={run_dir}",
                       "train.steps=60", "log.every=5", "log.sample_every=30", "ckpt.every=20",
                       "ckpt.keep=2", "log.tracker=wandb", "optim.lr=1e-3", "model.dropout=false",
                       "data.flip=false"], env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_demo_run_leaves_checkpoints_generator_grid_and_config(demo_run):
    run_dir, proc = demo_run
    assert "done: 60 steps" in proc.stdout
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000040", "step-00000060"]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    generator = load_export(run_dir / "generator.safetensors").generator
    with torch.no_grad():
        assert generator(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    assert (run_dir / "samples" / "latest.png").is_file()
    assert len(list((run_dir / "samples").glob("step-*.png"))) == 2  # steps 30 and 60
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["steps"] == 60 and saved["model"]["ngf"] == 16


def test_demo_run_logs_every_interval(demo_run):
    rows = stats(demo_run[0])
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert all(r["nonfinite_steps"] == 0 and r["perf/images_per_s"] > 0 for r in rows)
    assert rows[-1]["lr"] == 0.0  # a linear decay runs its last step at exactly 0 (recipe.py)


def test_overfitting_a_few_photos_lowers_l1_clearly(tmp_path):
    from PIL import Image
    from skimage import data

    from pix2pix_dist.shards import ShardOptions, build_shards

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.png")
    build_shards(ShardOptions(source=str(photos), output=tmp_path / "shards", val_fraction=0.0,
                              resize=64, workers=1, progress=False))
    run_dir = tmp_path / "run"
    proc = run_python(["train.py", *TINY, "data.batch_size=4", f"data.shards={tmp_path / 'shards'}",
                       f"run_dir={run_dir}", "train.steps=60", "log.every=10",
                       "log.tracker=none", "optim.lr=1e-3", "optim.decay_fraction=0",
                       "model.dropout=false", "data.flip=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    l1 = [r["loss/G_L1"] for r in stats(run_dir)]
    assert l1[-1] < 0.5 * l1[0], l1


def test_offline_wandb_run_holds_losses_and_sample_grid(demo_run):
    run_dir, proc = demo_run
    rows = history_rows(find_run_file(run_dir))
    keys = set().union(*rows)
    assert {"loss/D_real", "loss/D_fake", "loss/G_GAN", "loss/G_L1", "lr",
            "perf/images_per_s", "perf/data_wait_frac"} <= keys
    l1 = [r["loss/G_L1"] for r in rows if "loss/G_L1" in r]
    assert l1 == pytest.approx([r["loss/G_L1"] for r in stats(run_dir)], rel=1e-6)
    images = [r for r in rows if r.get("samples/_type") == "image-file"]
    assert len(images) == 2 and images[0]["samples/path"].startswith("media/images/")
    assert "wandb sync" in proc.stdout  # offline, and the user is told how to upload


def test_tracker_config_holds_the_resolved_recipe_and_config_json_the_given_one(demo_run):
    run_dir, _ = demo_run
    records = read_records(find_run_file(run_dir))
    sent = {item.key: json.loads(item.value_json)
            for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert [sent[f"recipe.{key}"] for key in ("world_size", "batch_per_process", "global_batch",
                                              "steps", "lr")] == [1, 2, 2, 60, 1e-3]
    saved = json.loads((run_dir / "config.json").read_text())
    assert "recipe" not in saved and saved["data"]["global_batch"] == 16  # as given


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(sample_shards, tmp_path):
    args = ["train.py", *TINY, f"data.shards={sample_shards}", "train.steps=40", "log.every=1",
            "log.sample_every=1000", "ckpt.every=1000", "log.tracker=none",
            "train.deterministic=true"]
    straight = run_python([*args, f"run_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, *args, f"run_dir={interrupted}"], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (interrupted / "stats.jsonl").exists() and len(stats(interrupted)) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in out
    [ckpt] = list_checkpoints(interrupted)
    stopped_at = int(ckpt.name.split("-")[1])
    assert 8 <= stopped_at < 40

    resumed = run_python([*args, f"run_dir={interrupted}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt} at step {stopped_at}" in resumed.stdout
    a = load_file(tmp_path / "straight" / "generator.safetensors")
    b = load_file(interrupted / "generator.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in stats(interrupted)] == list(range(1, 41))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_kill_9_after_a_checkpoint_then_resume_gives_the_same_export_bytes(sample_shards, tmp_path, backend):
    """The kill lands after the step-10 checkpoint exists (mid-epoch: the sample split's epoch
    is 7 batches); whichever checkpoint the run reached, resuming it must give the
    uninterrupted run's generator export byte for byte, with dropout on and 2 loader workers."""
    args = ["train.py", *TINY, f"data.shards={sample_shards}", "train.steps=24", "log.every=4",
            "log.sample_every=1000", "ckpt.every=10", "log.tracker=none",
            "train.deterministic=true", f"data.backend={backend}", "data.num_threads=2"]
    straight = run_python([*args, f"run_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *args, f"run_dir={killed}"], cwd=REPO, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list_checkpoints(killed):
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
    [*_, ckpt] = list_checkpoints(killed)
    assert int(ckpt.name.split("-")[1]) in (10, 20)

    resumed = run_python([*args, f"run_dir={killed}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt}" in resumed.stdout
    assert (killed / "generator.safetensors").read_bytes() == \
        (tmp_path / "straight" / "generator.safetensors").read_bytes()



def test_two_gloo_processes_keep_identical_weights_on_disjoint_data(sample_shards, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    env = clean_env(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))  # this checkout
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), "tests/ddp_worker.py", str(tmp_path), *TINY,
         f"data.shards={sample_shards}", f"run_dir={tmp_path / 'run'}", "train.steps=6",
         "log.every=3", "log.sample_every=6", "ckpt.every=3", "log.tracker=none"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training on 2 process(es)" in proc.stdout
    views = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [v["world"] for v in views] == [2, 2] and [v["step"] for v in views] == [6, 6]
    assert views[0]["batches"] == views[1]["batches"] > 0
    assert not set(views[0]["batch_sums"]) & set(views[1]["batch_sums"])  # different images
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Parameters must match exactly, and with model.norm=batch (statistics over both ranks'
    # images) so do G's and D's BatchNorm running statistics (issue 16).
    for net in ("G", "D"):
        assert sum("running_var" in k for k in states[0][net]) >= 3
        for key in states[0][net]:
            assert torch.equal(states[0][net][key], states[1][net][key]), (net, key)
    first_checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    initial = load_export(first_checkpoint / "generator.safetensors").generator
    assert any(not torch.equal(p, states[0]["G"][k]) for k, p in initial.state_dict().items())


def test_non_finite_losses_are_skipped_then_stop_the_run(sample_shards, tmp_path):
    proc = run_python(["tests/nan_worker.py", *TINY, f"data.shards={sample_shards}",
                       f"run_dir={tmp_path / 'run'}", "train.steps=50",
                       "train.max_nonfinite=3", "log.tracker=none"], env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 3 steps had non-finite losses")
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("update skipped") == 3


def test_missing_shards_is_one_line_error(tmp_path):
    proc = run_python(["train.py", *TINY, f"data.shards={tmp_path / 'nothing'}",
                       f"run_dir={tmp_path / 'run'}", "log.tracker=none"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nothing") in proc.stderr and "make shards" in proc.stderr


def test_resume_refuses_mixing_runs_and_skips_damaged_checkpoints(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    base = ["train.py", *TINY, f"data.shards={sample_shards}", f"run_dir={run_dir}",
            "log.tracker=none", "log.every=2", "ckpt.every=2", "ckpt.keep=3"]
    first = run_python([*base, "train.steps=6"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "finished", "step": 6}

    fresh = run_python([*base, "train.steps=6", "ckpt.resume=never"])
    assert fresh.returncode == 2 and "Traceback" not in fresh.stderr
    assert "already holds checkpoints up to step-00000006" in fresh.stderr
    other_model = run_python([*base, "train.steps=8", "model.ngf=8"])
    assert other_model.returncode == 2 and "Traceback" not in other_model.stderr
    assert "model.ngf=8 (checkpoint: 16)" in other_model.stderr

    newest = run_dir / "checkpoints" / "step-00000006" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a save cut short by a crash
    resumed = run_python([*base, "train.steps=8"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping damaged checkpoint" in resumed.stderr
    assert "at step 4" in resumed.stdout and "done: 8 steps" in resumed.stdout
    assert [r["step"] for r in stats(run_dir)] == [2, 4, 6, 8]  # 6 logged again after resume

    again = run_python([*base, "train.steps=8"])
    assert again.returncode == 0 and "already trained 8 of 8 steps" in again.stdout


@pytest.mark.parametrize("damage", ["truncated", "deleted", "fifo"])
def test_a_damaged_val_split_stops_training_instead_of_a_silent_fallback(sample_shards, tmp_path, damage):
    """Issue 17 item 5: a val shard the manifest lists but that cannot be read is one line and
    exit code 2 before anything is trained, never "no val split" and a run without evaluation."""
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    val = shards / "val-000000.tar"
    if damage == "truncated":
        val.write_bytes(val.read_bytes()[:1000])
    else:
        val.unlink()
        if damage == "fifo":
            os.mkfifo(val)
    args = ["train.py", *TINY, f"data.shards={shards}", f"run_dir={tmp_path / 'run'}",
            "log.tracker=none", "train.steps=2", "eval.every=1"]
    for argv in (args, [*args, "--dry-run"]) if damage == "truncated" else ([*args, "--dry-run"],):
        proc = run_python(argv, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.count("\n") == 1 and str(val) in proc.stderr and "val split" not in proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shards_without_a_val_split_train_on_announced_train_images(sample_shards, tmp_path):
    shards = tmp_path / "train_only"
    shards.mkdir()
    for tar in sample_shards.glob("train-*.tar"):
        shutil.copy(tar, shards / tar.name)  # another tool's shards: no manifest, no val-*.tar
    proc = run_python(["train.py", *TINY, f"data.shards={shards}", f"run_dir={tmp_path / 'run'}",
                       "log.tracker=none", "train.steps=2", "eval.every=2", "eval.count=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"warning: {shards} has no val split") == 1
