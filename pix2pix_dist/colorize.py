"""Colorize photos with a trained generator export.

    python -m pix2pix_dist.colorize --generator runs/demo/generator.safetensors photos/ --output out/

The generator sees the L channel resized to `--size` (a multiple of 2**num_downs); its ab
prediction is resized back and combined with the full-resolution L, so outputs keep the input's
size and sharpness. Unreadable inputs are skipped and counted.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_write
from .checkpoints import CheckpointError, load_generator
from .data import lab_to_rgb, rgb_to_lab

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def colorize(generator: torch.nn.Module, rgb01: torch.Tensor, size: int) -> torch.Tensor:
    """(1,3,H,W) RGB in [0,1] (colour or gray) -> (1,3,H,W) colorized RGB in [0,1]."""
    L, _ = rgb_to_lab(rgb01)
    small = F.interpolate(L, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    with torch.no_grad():
        ab = generator(small).float()
    ab = F.interpolate(ab, size=L.shape[-2:], mode="bilinear", align_corners=False)
    return lab_to_rgb(L, ab)


def _inputs(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


def _safe_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem).strip("_") or "image"


def _setup(args: argparse.Namespace) -> torch.nn.Module:
    """Check the options and load the generator; ValueError/CheckpointError in one line."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but no CUDA device is available; use --device cpu")
    if args.output.exists() and not args.output.is_dir():
        raise ValueError(f"--output {args.output} exists and is not a folder")
    generator = load_generator(args.generator, args.device)
    step = 2 ** generator.num_downs
    if args.size < step or args.size % step:
        raise ValueError(f"--size {args.size} must be a positive multiple of {step}")
    args.output.mkdir(parents=True, exist_ok=True)
    return generator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pix2pix-colorize", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--generator", required=True, type=Path, help="generator.safetensors")
    parser.add_argument("--output", type=Path, default=Path("colorized"), help="output folder")
    parser.add_argument("--size", type=int, default=256, help="generator input size (default 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        generator = _setup(args)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = _inputs(args.inputs)
    if not files:
        print(f"error: no images found in {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return 2
    written, skipped, used = 0, 0, set()
    for path in files:
        try:
            with Image.open(path) as im:
                rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32) / 255
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            skipped += 1
            print(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(args.device)
        out = colorize(generator, x, args.size)[0].permute(1, 2, 0).cpu().numpy()
        name = _safe_name(path)
        while name in used:  # two inputs with the same stem in different folders
            name += "_"
        used.add(name)
        png = io.BytesIO()
        Image.fromarray((out * 255 + 0.5).astype(np.uint8)).save(png, format="PNG")
        atomic_write(args.output / f"{name}.png", png.getvalue())
        written += 1
    print(f"colorized {written} image(s) into {args.output}" + (f", skipped {skipped}" if skipped else ""))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
