"""Command lines derived from typed dataclasses, with one-line errors.

Every command of the project declares its options once, as the fields of a dataclass: a type
(choices as `Literal[...]`), a default and a docstring under the field. tyro derives the parser
and the `--help` text from that; this module adds what tyro does not do the way our users expect:

- bare `key=value` arguments (`data.batch_size=32`, the habit of Accelerate/Hydra users) are read
  as `--key value`; `--key value`, `--key=value`, `_` and `-` spellings all work (tyro's own);
- a bad value or an unknown option is one line on stderr (`error: ...`, exit code 2) instead of
  tyro's framed box, which is hard to read in a launcher's interleaved multi-rank output.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, TypeVar

import tyro

from .errors import UserError

T = TypeVar("T")

Maybe = Annotated[T | None, tyro.conf.arg(help_behavior_hint="")]
"""`Maybe[int] = None`: an option that may be left out, its docstring saying what that means;
--help then shows that one default, not a second "(default: None)"."""

# tyro frames its messages with box-drawing characters; a rule (─) starts the help part.
_FRAME = re.compile(r"[\u2500-\u257f]")


class CliError(UserError):
    """A problem with the command line or the settings it names (config.ConfigError: a preset,
    config file or key), reported as one line by rank 0: every rank reads the same ones."""

    all_ranks = True


def expand_key_values(argv: Sequence[str], aliases: Mapping[str, str] = {}) -> list[str]:
    """`key=value` -> `--key value`, and short aliases (`--steps` -> `--train.steps`)."""
    out: list[str] = []
    for arg in argv:
        if not arg.startswith("-") and "=" in arg:
            key, value = arg.split("=", 1)
            out += [f"--{aliases.get(key, key)}", value]
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            out.append(f"--{aliases.get(key, key)}{eq}{value}")
        else:
            out.append(arg)
    return out


def parse(cls: type[T], argv: Sequence[str], *, prog: str, description: str,
          default: T | None = None, aliases: Mapping[str, str] = {}) -> T:
    """An instance of `cls` from `argv`; `--help` prints and exits 0; a problem raises CliError.

    `default` supplies the starting values (e.g. a preset); `aliases` maps short option names
    to dotted keys."""
    args = expand_key_values(argv, aliases)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(cls, args=args, prog=prog, description=description, default=default)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help: tyro printed it on stdout
            raise
        raise CliError(_one_line(captured.getvalue())) from None


def _one_line(framed: str) -> str:
    """The message of tyro's error box, on one line (the lines above its first rule)."""
    words: list[str] = []
    for line in framed.splitlines():
        if "\u256d" in line:  # the box's top border holds only a title ("Value error")
            continue
        if "\u2500" in line and words:  # the rule between message and help text
            break
        text = _FRAME.sub(" ", line).strip()
        if text and not text.lower().startswith(("usage:", "for full helptext")):
            words.append(text)
    message = " ".join(" ".join(words).split())
    return message or "cannot read the command line (see --help)"

