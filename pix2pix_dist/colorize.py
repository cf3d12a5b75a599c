"""Colorize photos with a trained generator export.

    python -m pix2pix_dist.colorize --generator runs/demo/generator.safetensors photos/ --output out/

Each photo is seen the way training saw images (shorter side scaled to the training crop size,
aspect ratio kept, or squashed for `data.resize=square` recipes), in the norm mode the recipe
records; the predicted colour is resized to the photo's full resolution and combined with its
own full-resolution lightness (pix2pix_dist/inference.py). The input folder structure is kept
under --output. Unreadable, oversized, too thin and non-regular files are skipped and counted.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from PIL import Image

from .atomic import atomic_write
from .cli import CliError, Maybe, parse
from .errors import run_main
from .export import GeneratorExport, NormMode, load_export
from .imageio import DEFAULT_MAX_PIXELS, Skip, display_name, find_image_files, load_image, to_rgb
from .inference import (GeometryError, RowReader, compose_rows, image_seed, model_input_rows,
                        predict_ab)

PROGRESS_MIN_FILES = 6
"""A progress bar for this many files or more; a handful finish before one would help."""


@dataclass
class ColorizeOptions:
    inputs: tyro.conf.Positional[list[Path]]
    """Image files or folders (searched recursively, following symbolic links, skipping hidden
    files and folders)."""
    generator: Path
    """A generator export: generator.safetensors, or the run or checkpoint folder that holds it."""
    output: Path = Path("colorized")
    """Output folder; the input folders' structure is kept below it."""
    format: Literal["png", "jpeg"] = "png"
    """Output file format."""
    quality: int = 95
    """JPEG quality (with --format jpeg)."""
    norm_mode: Maybe[Literal["eval", "batch"]] = None
    """Override the norm mode recorded in the export (see `train.py --help`, eval.norm_mode)."""
    batch_size: Maybe[int] = None
    """Images per forward pass in `eval` norm mode (same network input size only); default 8 on
    a GPU, 1 on CPU."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Skip (and count as too_large) images with more pixels than this, before decoding them."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the generator runs; `auto` picks the GPU when there is one."""
    progress: bool = True
    """Progress bar for more than a handful of files."""


def find_inputs(paths: list[Path], output: Path | None = None
                ) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, path relative to its input argument) for every candidate image, in order, and the
    subfolders that could not be listed. Folders are searched by the shard writer's rule
    (imageio.find_image_files); a file given by name is taken as it is. An `output` folder below
    an input folder is not searched: a rerun of `colorize photos/ --output photos/colorized`
    must not colorize its own results again."""
    found: list[tuple[Path, Path]] = []
    unreadable: list[str] = []
    for path in paths:
        if not path.is_dir():
            found.append((path, Path(path.name)))
            continue
        files, folders = find_image_files(path, exclude=output)
        found += [(file, Path(relpath)) for relpath, file in files]
        unreadable += [f"{path}/{folder}" for folder in folders]
    return found, unreadable


def _safe(part: str) -> str:
    """A path component from data: letters, digits, `_.-` only, no leading dot (so never `..`)."""
    return re.sub(r"[^\w.-]+", "_", part).lstrip(".") or "image"


def output_name(relative: Path, suffix: str, used: set[str]) -> Path:
    """A path under the output folder for `relative`, distinct from every name in `used`
    (compared case-insensitively, for case-insensitive file systems), which it joins."""
    folders = [_safe(p) for p in relative.parent.parts]
    stem = _safe(relative.stem)
    candidate, n = Path(*folders, stem + suffix), 1
    while str(candidate).lower() in used:
        n += 1
        candidate = Path(*folders, f"{stem}-{n}{suffix}")
    used.add(str(candidate).lower())
    return candidate


def colorize_files(opts: ColorizeOptions, exported: GeneratorExport, device: torch.device,
                   files: list[tuple[Path, Path]]) -> tuple[int, dict[str, int]]:
    """Load, batch (same network input size), predict and write `files` (from find_inputs);
    (images written, skip counts)."""
    from tqdm.auto import tqdm

    generator, settings = exported.generator, exported.settings
    mode: NormMode = opts.norm_mode or settings.norm_mode
    batch_size = opts.batch_size or (8 if device.type == "cuda" else 1)
    suffix = ".jpg" if opts.format == "jpeg" else ".png"
    root = opts.output.resolve()
    # Inputs inside --output keep their names: `colorize photos/ --output photos/` must not
    # write photos/a.png over the photo photos/a.png (it gets a-2.png instead).
    used = {os.path.relpath(os.path.realpath(p), root).lower() for p, _ in files}
    skipped: Counter[str] = Counter()

    def loaded() -> Iterator[tuple[Path, Image.Image, torch.Tensor, int, int, int]]:
        for path, relative in tqdm(files, unit="img", dynamic_ncols=True,
                                   disable=not opts.progress or len(files) < PROGRESS_MIN_FILES):
            try:
                image = load_image(path, opts.max_pixels)
                L, h, w = model_input_rows(image_rows(image), image.height, image.width, settings,
                                           2 ** generator.num_downs, device)
            except (Skip, GeometryError) as exc:
                skipped[exc.reason if isinstance(exc, Skip) else "too_thin"] += 1
                # One line, whatever the name.
                tqdm.write(f"skipped {display_name(str(path))}: {exc}", file=sys.stderr)
                continue
            yield output_name(relative, suffix, used), image, L, h, w, image_seed(str(relative))

    written = 0
    for _, same_size in itertools.groupby(loaded(), key=lambda item: item[2].shape):
        while batch := list(itertools.islice(same_size, batch_size)):
            ab = predict_ab(generator, torch.cat([item[2] for item in batch]), mode,
                            [item[5] for item in batch])
            for (dest, image, _, h, w, _), one in zip(batch, ab):
                image = colorized(image, one[:, :h, :w])
                data = io.BytesIO()  # PNG ignores `quality`
                image.save(data, format=opts.format, quality=opts.quality)
                image.close()
                target = opts.output / dest
                # Checked before mkdir, which would otherwise create folders behind the link.
                if not target.parent.resolve().is_relative_to(root):
                    raise CliError(f"{target.parent} leads outside --output {opts.output} "
                                   f"(a symbolic link?); refusing to write there")
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, data.getvalue())
                written += 1
    return written, dict(skipped)


def image_rows(image: Image.Image) -> RowReader:
    """A RowReader over a decoded image of any mode (converted to RGB a strip at a time)."""
    def read(top: int, bottom: int) -> torch.Tensor:
        with warnings.catch_warnings():  # read-only pixels: nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(to_rgb(image.crop((0, top, image.width, bottom))))
    return read


def colorized(image: Image.Image, ab: torch.Tensor) -> Image.Image:
    """`image`'s own lightness with the colour `ab` (2,h,w normalised), as an RGB image: written
    over `image` itself when it is RGB (each strip is read before it is overwritten), else into
    a new one. Peak memory per pixel: docs/design.md ("Colorize memory")."""
    out = image if image.mode == "RGB" else Image.new("RGB", image.size)

    def write(top: int, rows: torch.Tensor) -> None:
        out.paste(Image.fromarray(rows.cpu().numpy()), (0, top))

    compose_rows(image_rows(image), write, image.height, image.width, ab)
    if out is not image:
        image.close()
    return out


def run(opts: ColorizeOptions) -> int:
    """Colorize every input; the exit code (0: some written, 1: none)."""
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda but no CUDA device is available; use --device cpu")
    device = torch.device("cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu")
    if not opts.inputs:
        raise CliError("give at least one image file or folder to colorize")
    for path in opts.inputs:
        if not path.exists():
            raise CliError(f"input {path} does not exist")
    if opts.output.exists() and not opts.output.is_dir():
        raise CliError(f"--output {opts.output} exists and is not a folder")
    if opts.max_pixels < 1 or (opts.batch_size is not None and opts.batch_size < 1) \
            or not 1 <= opts.quality <= 100:
        raise CliError("--max-pixels and --batch-size must be at least 1, --quality in 1..100")
    exported = load_export(opts.generator, device)
    files, unreadable = find_inputs(opts.inputs, opts.output)
    for folder in unreadable:  # counted like an unreadable file, not silently dropped
        print(f"skipped {display_name(folder)}: folder cannot be listed", file=sys.stderr)
    if not files:
        raise CliError(f"no images found in {', '.join(map(str, opts.inputs))}")
    opts.output.mkdir(parents=True, exist_ok=True)
    written, skipped = colorize_files(opts, exported, device, files)
    if unreadable:
        skipped["unreadable"] = skipped.get("unreadable", 0) + len(unreadable)
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    print(f"colorized {written} image(s) into {opts.output}"
          + (f"; skipped {sum(skipped.values())} ({counts})" if counts else ""))
    return 0 if written else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_main(lambda: run(parse(ColorizeOptions, argv, prog="pix2pix-colorize",
                                      description=__doc__.split("\n\n")[0])))


if __name__ == "__main__":
    sys.exit(main())
