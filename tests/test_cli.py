"""The shared command-line layer: key=value spellings and one-line errors."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal

import pytest

from pix2pix_dist.cli import CliError, parse


@dataclass
class _Inner:
    batch_size: int = 16
    """Images per process."""
    backend: Literal["auto", "dali", "torch"] = "auto"
    """Input pipeline."""


@dataclass
class _Options:
    run_dir: str = "runs/x"
    """Run folder."""
    inner: _Inner = field(default_factory=_Inner)


def _parse(*argv: str) -> _Options:
    return parse(_Options, list(argv), prog="t", description="test", aliases={"bs": "inner.batch_size"})


@pytest.mark.parametrize("argv", [["inner.batch_size=3"], ["--inner.batch_size", "3"],
                                  ["--inner.batch-size=3"], ["--bs", "3"], ["bs=3"]])
def test_every_spelling_sets_the_same_key(argv):
    assert _parse(*argv).inner.batch_size == 3


def test_default_instance_supplies_starting_values():
    opts = parse(_Options, ["run_dir=b"], prog="t", description="d", default=_Options(inner=_Inner(7)))
    assert (opts.run_dir, opts.inner.batch_size) == ("b", 7)


@pytest.mark.parametrize("argv, expected", [
    (["--inner.batch_size", "x"], "--inner.batch-size"),
    (["inner.backend=foo"], "'auto', 'dali', 'torch'"),
    (["--nope", "1"], "--nope"),
])
def test_errors_are_one_line_naming_the_key(argv, expected):
    with pytest.raises(CliError) as info:
        _parse(*argv)
    message = str(info.value)
    assert expected in message and "\n" not in message and "\u2502" not in message


def test_help_exits_zero_and_lists_docstrings(capsys):
    with pytest.raises(SystemExit) as info:
        _parse("--help")
    assert info.value.code == 0
    assert "Images per process." in capsys.readouterr().out


@pytest.mark.parametrize("module", ["pix2pix_dist.shards.cli", "pix2pix_dist.bench.cli",
                                    "pix2pix_dist.colorize", "pix2pix_dist.evaluate"])
def test_help_shows_one_default_per_option(module, capsys, monkeypatch):
    """An option that may be left out says in its docstring what that means ("default: 2048 on
    CUDA, 96 on CPU"); tyro must not add a second "(default: None)" after it."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: nothing wraps a default apart
    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--output" in out and "(default: None)" not in out
    assert all(line.count("default:") <= 1 for line in out.splitlines())
