"""Config: presets, command-line spellings and order, one-line errors, --help, config files."""

import dataclasses
import json

import pytest

from pix2pix_dist.config import (PRESETS, Config, ConfigError, build_config, leaf_items,
                                 parse_command)
from pix2pix_dist.train_loop import main


def test_presets_resolve_and_validate():
    for name in PRESETS:
        cfg = build_config(name)
        assert cfg.data.crop_size % 2 ** cfg.model.num_downs == 0
    tutorial = build_config("tutorial")
    assert (tutorial.data.global_batch, tutorial.data.batch_size, tutorial.train.epochs) == (16, 0, 100)
    assert (tutorial.data.resize, tutorial.data.load_size, tutorial.data.crop_size) == ("square", 256, 256)
    assert tutorial.optim.decay_fraction == 0 and tutorial.train.mixed_precision == "auto"
    paper = build_config("paper")
    assert (paper.data.global_batch, paper.train.epochs, paper.optim.decay_fraction) == (1, 200, 0.5)
    assert paper.eval.norm_mode == "batch"
    # the reference's resize_and_crop: a 286x286 squash, then the 256 crop
    assert (paper.data.resize, paper.data.load_size, paper.data.crop_size) == ("square", 286, 256)
    # BatchNorm over the recipe's batch; the throughput preset's per-process choice is stated
    assert tutorial.model.norm == paper.model.norm == "batch"
    assert build_config("coco").model.norm == "batch_local"


def test_old_config_files_name_global_batchnorm_syncbatch(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"model": {"norm": "syncbatch"}}))
    assert build_config(config_file=str(path)).model.norm == "batch"
    with pytest.raises(ConfigError, match="model.norm: expected 'batch' or 'batch_local' or "
                                          "'instance', got 'group'"):
        build_config(overrides=[("model.norm", "group")])


@pytest.mark.parametrize("args", [
    ["data.global_batch=32", "--train.compile", "true", "--optim.lr=1e-3", "--log.tracker", "none"],
    ["--data.global_batch", "32", "train.compile=True", "optim.lr=1e-3", "log.tracker=none"],
    ["--data.global-batch=32", "--train.compile=1", "--optim.lr", "1e-3", "log.tracker=none"],
])
def test_every_spelling_sets_typed_values(args):
    cfg = parse_command(["--preset", "tutorial", *args])[0]
    assert cfg.data.global_batch == 32 and cfg.train.compile is True
    assert cfg.optim.lr == 1e-3 and cfg.log.tracker == "none"
    assert cfg.data.resize == "square"  # the rest of the preset is kept


def test_short_forms_and_dry_run_flag():
    cfg, dry_run = parse_command(["--resume", "never", "--shards=/data/s", "--steps", "10"])
    assert (cfg.ckpt.resume, cfg.data.shards, cfg.train.steps, dry_run) == ("never", "/data/s", 10, False)
    assert parse_command(["--preset", "paper", "--dry-run"])[1] is True


@pytest.mark.parametrize("args, dry_run", [
    (["--dry-run"], True), (["--dry-run=true"], True), (["--dry-run", "false"], False),
    (["--dry-run=false", "data.global_batch=8"], False), (["dry_run=yes", "--steps", "3"], True),
    (["--dry-run", "--steps", "3"], True), (["--steps", "3", "--dry_run"], True), ([], False),
])
def test_dry_run_is_a_flag_or_takes_a_value(args, dry_run):
    assert parse_command(["--preset", "tutorial", *args])[1] is dry_run


def test_dry_run_with_a_wrong_value_is_one_line():
    with pytest.raises(ConfigError, match="--dry-run: expected true or false, got .maybe.$"):
        parse_command(["--dry-run=maybe"])


def test_order_is_defaults_preset_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": {"global_batch": 8, "load_size": 300}, "run_dir": "runs/f"}))
    cfg = parse_command(["data.load_size=320", "--config", str(path), "--preset", "tutorial"])[0]
    assert cfg.data.global_batch == 8  # the file beats the preset ...
    assert cfg.data.load_size == 320  # ... and the command line beats the file
    assert cfg.run_dir == "runs/f" and cfg.data.resize == "square"  # file, preset
    assert Config().data.resize == "shorter_side"  # the defaults are untouched


@pytest.mark.parametrize("args, message", [
    (["data.global_batch=0"], "data.global_batch=0 is out of range"),
    (["data.crop_size=200"], "divisible by 2**model.num_downs"),
    (["model.norm=group"], "invalid choice 'group' for argument '--model.norm'"),
    (["data.resize=stretch"], "invalid choice 'stretch' for argument '--data.resize'"),
    (["optim.lr_scaling=cubic"], "'--optim.lr-scaling'"),
    (["data.bogus=1"], "Unrecognized options: --data.bogus"),
    (["train.steps=many"], "--train.steps: invalid literal for int()"),
    (["train.compile=maybe"], "--train.compile: expected true or false"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["data.load_size=128"], "data.load_size=128 must be at least data.crop_size=256"),
    (["ckpt.resume=/nonexistent/step-1"], "no such checkpoint"),
    (["optim.lr=inf"], "optim.lr=inf is not a finite number"),
    (["optim.lambda_l1=nan"], "optim.lambda_l1=nan is not a finite number"),
    (["optim.lr=1e30"], "optim.lr=1e+30 is out of range: it must be in (0, 1]"),
    (["optim.lr=0"], "optim.lr=0.0 is out of range"),
    (["optim.beta1=1"], "optim.beta1=1.0 is out of range"),
    (["train.epochs=0"], "train.epochs=0.0 is out of range"),
    (["optim.decay_fraction=1.5"], "optim.decay_fraction=1.5 is out of range"),
    (["data.prefetch=100000"], "data.prefetch=100000 is out of range: it must be in [1, 32]"),
    (["data.num_threads=100000"], "data.num_threads=100000 is out of range"),
    (["run_dir="], "run_dir is empty"),
    (["data.shards= "], "data.shards is empty"),
    (["ckpt.resume="], "ckpt.resume is empty"),
    (["eval.every=-1"], "eval.every=-1 is out of range"),
    (["eval.count=0"], "eval.count=0 is out of range"),
    (["model.d_layers=5", "data.crop_size=64", "data.load_size=64", "model.num_downs=6"],
     "model.d_layers=5 is too deep for data.crop_size=64"),
])
def test_invalid_settings_give_one_line_naming_the_key(args, message):
    with pytest.raises(ConfigError) as err:
        parse_command(args)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args", [["optim.lr=inf"], ["data.batch_size=x"], ["run_dir="]])
def test_main_reports_config_errors_in_one_line_with_exit_2(args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def test_help_lists_every_key_with_default_and_docstring(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--preset", "tutorial", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for key, _ in leaf_items(Config()):
        assert f"--{key.replace('_', '-')} " in text, key
    assert "hardware decoder" in text and "(default: square)" in text  # the preset's value
    assert "batch_size x processes" in text  # the precedence rule is stated


def test_help_lists_the_preset_names_only(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--preset {" + ",".join(PRESETS) + "}" in text and "--config FILE.json" in text
    assert "{None" not in text and "None}" not in text


def test_config_file_and_save_roundtrip(tmp_path):
    cfg = build_config("cpu-demo", overrides=[("train.steps", 7)])
    cfg.save(tmp_path / "config.json")
    again = parse_command(["--config", str(tmp_path / "config.json")])[0]
    assert again == cfg
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 7
    assert dataclasses.asdict(again)["eval"] == {"norm_mode": "eval", "every": 200, "count": 8}


@pytest.mark.parametrize("content, message", [
    ('{"data": {"batch_size": null}}', "data.batch_size: expected int, got None"),
    ('{"data": {"global_batch": 2.5}}', "data.global_batch: expected int, got 2.5"),
    ('{"train": {"compile": 1}}', "train.compile: expected bool, got 1"),
    ('{"data": {"resize": "stretch"}}', "data.resize: expected 'shorter_side' or 'square', got 'stretch'"),
    ('{"optim": {"decay_steps": 5}}', "unknown config key 'optim.decay_steps'"),
    ('[1, 2]', "must hold a JSON object"),
    ('{"data": ', "cannot read config file"),
])
def test_config_file_values_are_type_checked(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        parse_command(["--config", str(path)])
    assert message in str(err.value) and "\n" not in str(err.value)
