"""The training state's owner (checkpoints.py): what a checkpoint holds, its checksums, the
fallback past damaged files, the model-settings check and the non-finite guard.

In-process with a real (single-process) Accelerator and tiny real networks: each test is fast."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import shutil

import pytest
import torch

from pix2pix_dist.checkpoints import (MANIFEST, CheckpointError, CheckpointManager,
                                      list_checkpoints, verify_checkpoint)
from pix2pix_dist.atomic import file_sha256
from pix2pix_dist.config import Config
from pix2pix_dist.export import generator_meta
from pix2pix_dist.gan_step import build_networks
from pix2pix_dist.recipe import resolve_recipe


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def tiny_config() -> Config:
    cfg = Config()
    cfg.model.ngf, cfg.model.ndf, cfg.model.num_downs = 4, 4, 5
    cfg.train.mixed_precision = "no"
    return cfg


def manager(run_dir, accelerator, cfg: Config | None = None, keep: int = 5) -> CheckpointManager:
    cfg = cfg or tiny_config()
    cfg.run_dir, cfg.ckpt.keep = str(run_dir), keep
    torch.manual_seed(0)
    nets = build_networks(cfg, accelerator)
    return CheckpointManager(run_dir, nets, accelerator, keep=keep,
                             model=dataclasses.asdict(cfg.model),
                             recipe=resolve_recipe(cfg, 1, train_images=64),
                             export_meta=functools.partial(generator_meta, cfg))


def train_a_little(ckpt: CheckpointManager) -> None:
    """One real Adam update on both nets, so optimizer state exists and weights moved."""
    for net, opt in ((ckpt.nets.G_raw, ckpt.nets.opt_G), (ckpt.nets.D_raw, ckpt.nets.opt_D)):
        x = torch.randn(2, 1 if net is ckpt.nets.G_raw else 3, 32, 32)
        net(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()


def saved_steps(run_dir) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)]


def test_resume_restores_every_part_of_the_state(tmp_path, accelerator):
    ckpt = manager(tmp_path, accelerator)
    train_a_little(ckpt)
    torch.manual_seed(1234)
    random.seed(99)
    path = ckpt.save(7, nonfinite=2)
    expected_noise, expected_py = torch.rand(3), random.random()
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"state.pt", "rng-rank0.pt", "generator.safetensors"}
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (path / name).stat().st_size, "sha256": file_sha256(path / name)}
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))

    fresh = manager(tmp_path, accelerator)
    assert fresh.resume("auto", seed=0) == (7, 2)
    assert fresh.resumed_from == path
    assert torch.equal(torch.rand(3), expected_noise) and random.random() == expected_py
    for a, b in ((ckpt.nets.G_raw, fresh.nets.G_raw), (ckpt.nets.D_raw, fresh.nets.D_raw)):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key
    moments = [s["exp_avg"] for s in fresh.nets.opt_G.state_dict()["state"].values()]
    saved = [s["exp_avg"] for s in ckpt.nets.opt_G.state_dict()["state"].values()]
    assert moments and all(torch.equal(x, y) for x, y in zip(moments, saved))


def zero_4k(path) -> None:
    """Zero 4 KB in the middle of a file, keeping its size (a bad disk block)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(min(4096, len(data) - middle))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["state.pt", "rng-rank0.pt"])
def test_a_damaged_file_falls_back_to_the_previous_checkpoint(tmp_path, accelerator, capsys, damaged):
    ckpt = manager(tmp_path, accelerator)
    for step in (2, 4):
        train_a_little(ckpt)
        ckpt.save(step, nonfinite=0)
    zero_4k(tmp_path / "checkpoints" / "step-00000004" / damaged)
    with pytest.raises(CheckpointError, match=f"{damaged} does not match its sha256"):
        verify_checkpoint(tmp_path / "checkpoints" / "step-00000004")

    fresh = manager(tmp_path, accelerator)
    assert fresh.resume("auto", seed=0) == (2, 0)
    out = capsys.readouterr().err
    assert f"skipping damaged checkpoint {tmp_path / 'checkpoints' / 'step-00000004'}" in out
    assert damaged in out
    # Set aside, so pruning counts intact checkpoints only: with keep=2, saving 3 and 4 again
    # must keep the good 2 out of it until two newer intact ones exist.
    assert saved_steps(tmp_path) == [2] and (tmp_path / "checkpoints" / "step-00000004.damaged").is_dir()
    fresh.keep = 2
    fresh.save(3, nonfinite=0)
    assert saved_steps(tmp_path) == [2, 3]


def test_damaged_everywhere_or_named_damaged_is_an_error_not_a_fresh_start(tmp_path, accelerator):
    ckpt = manager(tmp_path, accelerator)
    path = ckpt.save(2, nonfinite=0)
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:1000])  # cut short
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        manager(tmp_path, accelerator).resume("auto", seed=0)
    with pytest.raises(CheckpointError, match="state.pt is 1000 bytes"):
        manager(tmp_path, accelerator).resume(str(path), seed=0)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        verify_checkpoint(path)


def test_manifest_names_cannot_leave_the_checkpoint(tmp_path, accelerator):
    path = manager(tmp_path, accelerator).save(2, nonfinite=0)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["../../config.json"] = {"bytes": 1, "sha256": "0"}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        verify_checkpoint(path)


def test_model_settings_that_changed_appeared_or_vanished_are_refused(tmp_path, accelerator):
    manager(tmp_path, accelerator).save(2, nonfinite=0)
    wider = tiny_config()
    wider.model.ngf = 8
    with pytest.raises(CheckpointError, match=r"model.ngf=8 \(checkpoint: 4\)"):
        manager(tmp_path, accelerator, wider).resume("auto", seed=0)

    renamed = manager(tmp_path, accelerator)
    renamed.model = {**{k: v for k, v in renamed.model.items() if k != "dropout"}, "depth": 3}
    with pytest.raises(CheckpointError) as info:
        renamed.resume("auto", seed=0)
    assert "model.depth=3 is not in the checkpoint" in str(info.value)
    assert "model.dropout is no longer a setting (checkpoint: True)" in str(info.value)


def test_a_checkpoint_of_the_old_syncbatch_name_resumes_as_batch(tmp_path, accelerator):
    old = manager(tmp_path, accelerator)
    old.model = {**old.model, "norm": "syncbatch"}  # model.norm=batch's name until issue 16
    old.save(2, nonfinite=0)
    manager(tmp_path, accelerator).resume("auto", seed=0)  # the same model: not refused


def test_another_global_batch_is_refused(tmp_path, accelerator):
    manager(tmp_path, accelerator).save(2, nonfinite=0)
    bigger = tiny_config()
    bigger.data.global_batch *= 2
    with pytest.raises(CheckpointError, match="was trained with a global batch of 16, this run's is 32"):
        manager(tmp_path, accelerator, bigger).resume("auto", seed=0)


def test_non_finite_weights_are_never_saved_and_the_last_good_one_is_named(tmp_path, accelerator):
    ckpt = manager(tmp_path, accelerator)
    good = ckpt.save(2, nonfinite=0)
    export = (tmp_path / "generator.safetensors").read_bytes()
    with torch.no_grad():
        next(ckpt.nets.G_raw.parameters())[0].fill_(float("nan"))
    with pytest.raises(CheckpointError) as info:
        ckpt.save(4, nonfinite=0)
    message = str(info.value)
    assert message.startswith("weights are not finite at step 4 (G.")
    assert f"the last good checkpoint is {good}" in message and "\n" not in message
    assert saved_steps(tmp_path) == [2]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert (tmp_path / "generator.safetensors").read_bytes() == export  # export untouched


def test_a_copied_or_renamed_folder_is_damaged_not_resumed_at_the_wrong_step(tmp_path, accelerator,
                                                                              capsys):
    ckpt = manager(tmp_path, accelerator)
    ten = ckpt.save(10, nonfinite=0)
    copy = ten.with_name("step-00000030")
    shutil.copytree(ten, copy)  # claims 30, holds 10: resuming would redo or skip steps
    with pytest.raises(CheckpointError, match="named for step 30 but holds step 10"):
        verify_checkpoint(copy)
    with pytest.raises(CheckpointError, match="is damaged: the folder is named for step 30"):
        manager(tmp_path, accelerator).resume(str(copy), seed=0)
    fresh = manager(tmp_path, accelerator)
    assert fresh.resume("auto", seed=0) == (10, 0) and fresh.resumed_from == ten
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    assert copy.with_name("step-00000030.damaged").is_dir() and saved_steps(tmp_path) == [10]
    moved = shutil.copytree(ten, tmp_path / "kept-aside")  # any other name: the manifest decides
    assert manager(tmp_path, accelerator).resume(str(moved), seed=0) == (10, 0)


def test_a_checkpoint_with_non_finite_weights_is_not_resumed_nor_called_good(tmp_path, accelerator):
    """A checkpoint found in the folder (written by hand, or by an older version) is not known
    to be good: resuming it is refused, and the non-finite message never names it."""
    ckpt = manager(tmp_path, accelerator)
    path = ckpt.save(2, nonfinite=0)
    state = torch.load(path / "state.pt", weights_only=True)
    next(iter(state["G"].values())).fill_(float("nan"))
    torch.save(state, path / "state.pt")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["state.pt"] = {"bytes": (path / "state.pt").stat().st_size,
                                     "sha256": file_sha256(path / "state.pt")}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"step-00000002 holds non-finite values \(G\."):
        manager(tmp_path, accelerator).resume("auto", seed=0)
    fresh = manager(tmp_path / "other", accelerator)
    with torch.no_grad():
        next(fresh.nets.G_raw.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="nothing saved: no checkpoint was saved"):
        fresh.check_finite(3)


def test_keep_prunes_the_oldest(tmp_path, accelerator):
    ckpt = manager(tmp_path, accelerator, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, nonfinite=0)
    assert saved_steps(tmp_path) == [2, 3]
