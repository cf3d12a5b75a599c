"""Command line of the shard writer: `python -m pix2pix_dist.shards` / `pix2pix-shards` / `make shards`."""

from __future__ import annotations

import signal
import sys
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from ..cli import parse
from ..errors import ShardError, run_main
from ..locking import FolderLock
from ..shard_format import SPLITS
from .build import build_shards
from .options import ShardOptions
from .verify import verify_shards

DESCRIPTION = """\
Turn a folder, zip or the bundled sample photos into shuffled WebDataset tar shards with DALI
indexes, for pix2pix colorization training.

examples:
  skimage's sample photos -> shards/sample:
    pix2pix-shards
  10,000 COCO photos (8,000 train + 2,000 val; the tutorial preset's sizes, not its images),
  not resized, so the preset's squash is the only resampling:
    pix2pix-shards --source /data/coco/train2017 --limit 10000 --output shards/coco
  COCO zips read in place, official val split:
    pix2pix-shards --source train2017.zip --val-source val2017.zip --output shards/coco
  check an existing output folder:
    pix2pix-shards --verify --output shards/coco

output folder: {train,val}-NNNNNN.tar (samples <key>.jpg + <key>.json), a DALI index
{train,val}-NNNNNN.idx beside each tar, manifest.json (written last: the "complete" marker) and
progress.json (what lets an interrupted or repeated run keep its finished shards). Shard files
that no progress.json or manifest.json of ours lists are never replaced: the run is refused.

images are converted to RGB (CMYK, palette, 16-bit; transparency on white), EXIF-rotated, and
dropped when grayscale (also RGB files whose channels are nearly equal), smaller than --min-size,
larger than --max-bytes or --max-pixels, not a regular file (FIFO, device), or unreadable
(corrupt, truncated, empty, not an image, dangling link, unlistable folder).
baseline RGB JPEGs needing no change keep their bytes; progressive and other non-baseline JPEGs
are re-encoded to baseline (the A100/H100 hardware JPEG decoder only takes baseline).
exit status: 0 ok, 1 verify found problems, 2 bad arguments/source/output or the output folder
in use by another writer, 130 interrupted.
"""


def _summary(manifest: dict[str, Any], seconds: float) -> str:
    """The few lines printed at the end of a run."""
    lines = []
    for s in SPLITS:
        info = manifest["splits"][s]
        n = len(info["shards"])
        lines.append(f"  {s:<5} {info['samples']:>9,} samples in {n:>4} shard{'s' if n != 1 else ''}"
                     f"  ({info['bytes'] / 1e6:,.1f} MB)")
    skipped = manifest.get("skipped", {})
    if total_skipped := sum(skipped.values()):
        lines.append(f"  skipped {total_skipped:,}:")
        for reason, count in sorted(skipped.items(), key=lambda kv: -kv[1]):
            ex = manifest.get("skipped_examples", {}).get(reason, [])[:3]
            more = ", ..." if count > len(ex) else ""
            lines.append(f"    {reason:<13} {count:>7,}  ({', '.join(ex)}{more})")
    total = sum(manifest["splits"][s]["samples"] for s in SPLITS)
    limit = manifest["args"].get("limit")
    if limit and total < limit:  # the subset is smaller than asked for: say so, not just the count
        lines.append(f"  note: --limit {limit} asked, only {total} usable images")
    head = f"wrote {total:,} samples to {manifest['args']['output']} in {seconds:.1f} s"
    return "\n".join([head] + lines)


def _report(problems: list[str], out: Path, show: int = 20) -> int:
    if not problems:
        print(f"verified {out}: all shards and indexes are good")
        return 0
    print(f"verify found {len(problems)} problem{'s' if len(problems) > 1 else ''} in {out}:", file=sys.stderr)
    for line in problems[:show]:
        print(f"  {line}", file=sys.stderr)
    if len(problems) > show:
        print(f"  ... and {len(problems) - show} more", file=sys.stderr)
    return 1


def _verify(out: Path, workers: int | None) -> int:
    if not out.is_dir():  # a wrong argument (exit 2), not a damaged folder (exit 1)
        raise ShardError(f"--verify: {out} is not a folder of shards")
    with ExitStack() as stack:
        with suppress(OSError):  # a read-only dataset folder: no writer of ours can be in it either
            stack.enter_context(FolderLock(out, "shard writer"))
        return _report(verify_shards(out, workers=workers), out)


def main(argv: list[str] | None = None) -> int:
    # `kill` gets the same clean stop as Ctrl-C (KeyboardInterrupt): unfinished tars removed,
    # complete ones kept.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run_main(lambda: _run(sys.argv[1:] if argv is None else argv),
                    interrupted="interrupted: complete shards are kept; run the same command "
                                "again to resume")


def _run(argv: list[str]) -> int:
    opts = parse(ShardOptions, argv, prog="pix2pix-shards", description=DESCRIPTION)
    if opts.verify and opts.source is None:
        if opts.output is None:
            raise ShardError("--verify without --source checks an existing folder: give --output DIR")
        return _verify(opts.output, opts.workers)
    t0 = time.perf_counter()
    manifest = build_shards(opts)
    print(_summary(manifest, time.perf_counter() - t0))
    return _verify(Path(manifest["args"]["output"]), opts.workers) if opts.verify else 0
