"""Options of the shard writer, their validation, and the parsing of `--shard-size`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..cli import Maybe
from ..errors import ShardError

_UNITS = {"": None, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class ShardOptions:
    """Options of `make shards`, declared once: the command line is derived from these fields."""

    source: Maybe[str] = None
    """Image folder (searched recursively: jpg jpeg png webp bmp tif tiff gif, any case), a zip such
    as COCO's train2017.zip (read in place), or 'sample' for scikit-image's photos. Default: sample;
    with --verify and no --source, only the existing --output folder is verified."""
    output: Maybe[Path] = None
    """Output folder (default: shards/<dataset>, dataset = 'sample' or the folder/zip name)."""
    val_source: Maybe[str] = None
    """Separate validation images (e.g. val2017): val is exactly these and --val-fraction is not
    used. Default: split --source by --val-fraction."""
    val_fraction: float = 0.2
    """Share of samples for val, 0 <= F < 1; at least one when F > 0 and there are >= 2; ignored
    with --val-source."""
    limit: Maybe[int] = None
    """Write N samples in total (train + val), a random subset chosen by --seed; with --val-source,
    N is shared between the sources in proportion to their image counts. Default: all."""
    seed: int = 0
    """Seed of subset, split and shuffle."""
    shard_size: str | int = "256MB"
    """Max tar size: 256MB, 1GB, 512MiB..., or a plain number of samples per tar."""
    resize: Maybe[int] = None
    """Downscale (Lanczos) so the shorter side is N; smaller images are kept as they are.
    Default: keep the size."""
    quality: int = 95
    """JPEG quality for re-encoded images (originals that need no change keep their bytes)."""
    min_size: int = 64
    """Drop images whose shorter side is below this many pixels."""
    gray_tolerance: int = 10
    """A pixel is gray when max(R,G,B) - min(R,G,B) <= T; images with <= 1% non-gray pixels are
    dropped."""
    max_bytes: str | int = "64MB"
    """Skip files larger than this (64MB, 1GB or bytes) as too_large, without reading them: zip
    bombs, huge scans."""
    max_pixels: int = 50_000_000
    """Skip images with more pixels than this (width x height, read from the header) as too_large,
    before decoding: a small PNG can claim 13000x13000 pixels, gigabytes once decoded. 50 MP takes
    every camera photo; each worker then needs at most about 1 GB."""
    workers: Maybe[int] = None
    """Decode/convert processes (default: all cores); the output does not depend on it."""
    progress: bool = True
    """Progress bar (terminal) or a status line every 30 s (logs) and notices on stderr;
    --no-progress prints only errors and the summary."""
    verify: bool = False
    """Re-read every shard and index afterwards (checksums, offsets, JPEG decoding); with no
    --source, only verify the existing --output folder."""


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
    if opts.max_pixels < 1:
        raise ShardError(f"--max-pixels must be >= 1, got {opts.max_pixels}")
    if not 0 <= opts.gray_tolerance <= 255:
        raise ShardError(f"--gray-tolerance must be in 0..255, got {opts.gray_tolerance}")
    parse_shard_size(opts.shard_size)
    parse_max_bytes(opts.max_bytes)
