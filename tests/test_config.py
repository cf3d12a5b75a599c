"""Config: presets, overrides from the command line, validation messages, schedule."""

import json

import pytest

from pix2pix_dist.config import PRESETS, Config, ConfigError, build_config, help_text, parse_args
from pix2pix_dist.train_loop import lr_factor, main


def test_presets_resolve_and_validate():
    for name in PRESETS:
        cfg = build_config(name)
        assert cfg.data.crop_size % 2 ** cfg.model.num_downs == 0
    assert build_config("paper").data.batch_size == 1
    tutorial = build_config("tutorial")
    assert (tutorial.data.batch_size, tutorial.data.crop_size) == (16, 256)


def test_overrides_in_both_forms_convert_types():
    cfg = parse_args(["--preset", "tutorial", "data.batch_size=32", "--train.compile", "true",
                      "--optim.lr=1e-3", "--log.tracker", "none"])
    assert cfg.data.batch_size == 32 and cfg.train.compile is True
    assert cfg.optim.lr == 1e-3 and cfg.log.tracker == "none"
    short = parse_args(["--resume", "never", "--shards=/data/s", "--steps", "10"])
    assert (short.ckpt.resume, short.data.shards, short.train.steps) == ("never", "/data/s", 10)


@pytest.mark.parametrize("args, message", [
    (["data.batch_size=0"], "data.batch_size must be at least 1"),
    (["data.crop_size=200"], "divisible by 2**model.num_downs"),
    (["model.norm=group"], "model.norm='group' is not one of"),
    (["data.bogus=1"], "unknown config key 'data.bogus'"),
    (["train.steps=many"], "train.steps: cannot read 'many' as int"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["data.load_size=128"], "data.load_size=128 must be at least data.crop_size=256"),
    (["ckpt.resume=/nonexistent/step-1"], "no such checkpoint"),
])
def test_invalid_settings_give_one_line_naming_the_key(args, message):
    with pytest.raises(ConfigError) as err:
        parse_args(args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_main_reports_config_errors_without_traceback(capsys):
    assert main(["data.crop_size=100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.crop_size=100") and "Traceback" not in err


def test_help_lists_every_key_with_its_docstring(capsys):
    text = help_text()
    assert "data.hw_decoder_load" in text and "hardware decoder" in text
    assert main(["--help"]) == 0 and "ckpt.resume" in capsys.readouterr().out


def test_config_file_and_save_roundtrip(tmp_path):
    cfg = build_config("cpu-demo", overrides=[("train.steps", "7")])
    cfg.save(tmp_path / "config.json")
    again = build_config(config_file=str(tmp_path / "config.json"))
    assert again == cfg
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 7


def test_lr_schedule_constant_then_linear_to_zero():
    cfg = Config()
    cfg.train.steps = 100
    assert lr_factor(0, cfg) == 1.0 and lr_factor(50, cfg) == 1.0
    assert lr_factor(75, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == 0.0
    cfg.optim.decay_steps = 0
    assert lr_factor(99, cfg) == 1.0


@pytest.mark.parametrize("content, message", [
    ('{"data": {"batch_size": null}}', "data.batch_size: expected int, got None"),
    ('{"data": {"batch_size": 2.5}}', "data.batch_size: expected int, got 2.5"),
    ('{"train": {"compile": 1}}', "train.compile: expected bool, got 1"),
    ('[1, 2]', "must hold a JSON object"),
])
def test_config_file_values_are_type_checked(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_config(config_file=str(path))
