"""Options of the shard writer, their validation, and the parsing of `--shard-size`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ShardError

_UNITS = {"": None, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class ShardOptions:
    source: str | os.PathLike = "sample"
    """'sample' (skimage's photos), an image folder (recursive) or a zip such as train2017.zip."""
    output: Path | None = None
    """Output folder; None gives shards/<dataset> (dataset = 'sample' or the folder/zip stem)."""
    val_source: str | os.PathLike | None = None
    """Separate validation images (e.g. COCO val2017); None splits `source` by `val_fraction`."""
    val_fraction: float = 0.2
    """Share of the samples that go to val (0 <= f < 1); at least one when f > 0 and n >= 2.
    Unused with `val_source`: then val is exactly that source."""
    limit: int | None = None
    """Total samples to write (train + val), a seeded random subset; None takes everything.
    With `val_source` it is divided between the two sources in proportion to their file counts."""
    seed: int = 0
    """Seed of the subset, the split and the write-time shuffle."""
    shard_size: str | int = "256MB"
    """Max shard size: '<n>MB' / 'GB' / 'MiB'... in bytes, or '<n>' / int samples per shard."""
    resize: int | None = None
    """Downscale so that the shorter side is this (never upscales); None keeps the size."""
    quality: int = 95
    """JPEG quality for re-encoded images (originals that need no change keep their bytes)."""
    min_size: int = 64
    """Drop images whose shorter side is below this many pixels."""
    workers: int | None = None
    """Decode/convert processes; None = os.cpu_count(). Output does not depend on it."""
    progress: bool = True
    """Progress bar (TTY) or a few status lines (non-TTY) and notices on stderr."""
    gray_tolerance: int = 10
    """Channel spread (max-min of R,G,B, 0..255) below which a pixel counts as gray."""
    max_bytes: str | int = "64MB"
    """Files larger than this ('64MB', '1GiB' or a number of bytes) are skipped as `too_large`
    without being read: a zip bomb or a huge scan must not exhaust a worker's memory."""


@dataclass(frozen=True)
class ShardLimit:
    max_samples: int | None
    max_bytes: int | None


def parse_shard_size(value: str | int) -> ShardLimit:
    """'256MB' -> at most 256e6 bytes per tar; '1000' or 1000 -> 1000 samples per tar."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value)) if not isinstance(value, bool) else None
    if not m or m.group(2).lower() not in _UNITS:
        raise ShardError(f"invalid shard size {value!r}: use e.g. 256MB, 1GB or 1000 (samples)")
    number, unit = float(m.group(1)), _UNITS[m.group(2).lower()]
    if unit is None:
        if number != int(number) or number < 1:
            raise ShardError(f"invalid shard size {value!r}: a sample count must be a whole number >= 1")
        return ShardLimit(int(number), None)
    if int(number * unit) < 1:
        raise ShardError(f"invalid shard size {value!r}")
    return ShardLimit(None, int(number * unit))


def parse_max_bytes(value: str | int) -> int:
    """'64MB' -> 64e6, '1GiB' -> 2**30, '5000' or 5000 -> 5000 (a plain number is bytes here)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value)) if not isinstance(value, bool) else None
    if m and m.group(2).lower() in _UNITS:
        n = int(float(m.group(1)) * (_UNITS[m.group(2).lower()] or 1))
        if n >= 1:
            return n
    raise ShardError(f"invalid --max-bytes {value!r}: use e.g. 64MB, 1GB or a number of bytes")


def validate(opts: ShardOptions) -> None:
    """Raise ShardError for the first invalid option, named as on the command line."""
    if not 0.0 <= opts.val_fraction < 1.0:
        raise ShardError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.limit is not None and opts.limit < 1:
        raise ShardError(f"--limit must be >= 1, got {opts.limit}")
    if not 1 <= opts.quality <= 100:
        raise ShardError(f"--quality must be in 1..100, got {opts.quality}")
    if opts.min_size < 1:
        raise ShardError(f"--min-size must be >= 1, got {opts.min_size}")
    if opts.resize is not None and opts.resize < opts.min_size:
        raise ShardError(f"--resize {opts.resize} is below --min-size {opts.min_size}")
    if opts.workers is not None and opts.workers < 1:
        raise ShardError(f"--workers must be >= 1, got {opts.workers}")
    if not 0 <= opts.gray_tolerance <= 255:
        raise ShardError(f"--gray-tolerance must be in 0..255, got {opts.gray_tolerance}")
    parse_shard_size(opts.shard_size)
    parse_max_bytes(opts.max_bytes)
