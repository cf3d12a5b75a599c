"""Command line of the shard writer: `python -m pix2pix_dist.shards` / `pix2pix-shards` / `make shards`."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from .build import build_shards
from .errors import ShardError
from .options import ShardOptions
from .summary import format_summary
from .verify import verify_shards

EPILOG = """\
examples:
  skimage's sample photos -> shards/sample:
    %(prog)s
  the tutorial's 10,000 COCO images (8,000 train + 2,000 val), shorter side 286:
    %(prog)s --source /data/coco/train2017 --limit 10000 --resize 286
  COCO zips read in place, official val split:
    %(prog)s --source train2017.zip --val-source val2017.zip --output shards/coco
  check an existing output folder:
    %(prog)s --verify --output shards/coco

output folder: {train,val}-NNNNNN.tar (samples <key>.jpg + <key>.json), a DALI index
{train,val}-NNNNNN.idx beside each tar, manifest.json (written last: the "complete" marker) and
progress.json (what lets an interrupted or repeated run keep its finished shards).

images are converted to RGB (CMYK, palette, 16-bit; transparency on white), EXIF-rotated, and
dropped when grayscale (also RGB files whose channels are nearly equal), smaller than --min-size,
larger than --max-bytes, or unreadable (corrupt, truncated, empty, not an image, dangling link).
baseline RGB JPEGs needing no change keep their bytes; progressive and other non-baseline JPEGs
are re-encoded to baseline (the A100/H100 hardware JPEG decoder only takes baseline).
exit status: 0 ok, 1 verify found problems, 2 bad arguments/source/output, 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    d = ShardOptions()
    p = argparse.ArgumentParser(
        prog="pix2pix-shards",
        description="Turn a folder, zip or the bundled sample photos into shuffled WebDataset tar "
                    "shards with DALI indexes, for pix2pix colorization training.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--source", default=None, metavar="PATH|sample",
      help="image folder (searched recursively: jpg jpeg png webp bmp tif tiff gif, any case), a zip "
           "such as COCO's train2017.zip (read in place), or 'sample' for scikit-image's photos "
           "(default: sample)")
    a("--output", type=Path, default=None, metavar="DIR",
      help="output folder (default: shards/<dataset>, dataset = 'sample' or the folder/zip name)")
    a("--val-source", default=None, metavar="PATH",
      help="separate validation images (e.g. val2017): val is exactly these and --val-fraction is "
           "not used; default: split --source by --val-fraction")
    a("--val-fraction", type=float, default=d.val_fraction, metavar="F",
      help="share of samples for val, 0 <= F < 1; at least one when F > 0 and there are >= 2; ignored "
           "with --val-source (default: %(default)s)")
    a("--limit", type=int, default=None, metavar="N",
      help="write N samples in total (train + val), a random subset chosen by --seed; with --val-source, "
           "N is shared between the sources in proportion to their image counts (default: all)")
    a("--seed", type=int, default=d.seed, help="seed of subset, split and shuffle (default: %(default)s)")
    a("--shard-size", default=d.shard_size, metavar="SIZE",
      help="max tar size: 256MB, 1GB, 512MiB..., or a plain number of samples per tar (default: %(default)s)")
    a("--resize", type=int, default=None, metavar="N",
      help="downscale (Lanczos) so the shorter side is N; smaller images are kept as they are (default: keep size)")
    a("--quality", type=int, default=d.quality, metavar="Q",
      help="JPEG quality for re-encoded images (default: %(default)s)")
    a("--min-size", type=int, default=d.min_size, metavar="N",
      help="drop images whose shorter side is below N pixels (default: %(default)s)")
    a("--gray-tolerance", type=int, default=d.gray_tolerance, metavar="T",
      help="a pixel is gray when max(R,G,B) - min(R,G,B) <= T; images with <= 1%% non-gray pixels are "
           "dropped (default: %(default)s)")
    a("--max-bytes", default=d.max_bytes, metavar="SIZE",
      help="skip files larger than SIZE (64MB, 1GB or bytes) as too_large, without reading them: "
           "zip bombs, huge scans (default: %(default)s)")
    a("--workers", type=int, default=None, metavar="N",
      help="decode/convert processes (default: all cores); the output does not depend on it")
    a("--no-progress", dest="progress", action="store_false",
      help="no progress bar or notices (errors and the summary are still printed)")
    a("--verify", action="store_true",
      help="re-read every shard and index (checksums, offsets, JPEG decoding); with no --source, only "
           "verify the existing --output folder")
    return p


def _on_sigterm(signum, frame):  # noqa: ARG001
    # `kill` gets the same clean stop as Ctrl-C: unfinished tars removed, complete ones kept.
    raise KeyboardInterrupt


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.verify and args.source is None:
            if args.output is None:
                raise ShardError("--verify without --source checks an existing folder: give --output DIR")
            return _report(verify_shards(args.output, workers=args.workers), args.output)
        opts = ShardOptions(
            source=args.source or "sample", output=args.output, val_source=args.val_source,
            val_fraction=args.val_fraction, limit=args.limit, seed=args.seed, shard_size=args.shard_size,
            resize=args.resize, quality=args.quality, min_size=args.min_size, workers=args.workers,
            progress=args.progress, gray_tolerance=args.gray_tolerance,
            max_bytes=args.max_bytes)
        t0 = time.perf_counter()
        manifest = build_shards(opts)
        print(format_summary(manifest, time.perf_counter() - t0))
        if args.verify:
            out = Path(manifest["args"]["output"])
            return _report(verify_shards(out, workers=args.workers), out)
        return 0
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: complete shards are kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
