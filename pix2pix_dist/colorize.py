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
import queue
import re
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
from .data.lab import one_cpu_thread
from .inference import (GeometryError, RowReader, compose_rows, image_seed, model_input_rows,
                        predict_ab)

PROGRESS_MIN_FILES = 6
"""A progress bar for this many files or more; a handful finish before one would help."""
PIPELINE_PIXELS = 32_000_000
"""Decoded pixels colorize holds at once: the next photos decode and the previous ones are
coloured and encoded while the network runs, as long as together they stay under this; a
larger photo runs alone. So peak memory is the base + 4-5 bytes per pixel of the larger of
this and the largest photo (docs/design.md, "Colorize memory")."""


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


class PipelineClosed(Exception):
    """Raised in the loader thread when colorize stops early (an error elsewhere)."""


class PixelBudget:
    """Admits decoded images into colorize's pipeline. `acquire(pixels)` waits until they fit
    `limit` beside the pixels already in flight, or until fewer than `min_count` images are in
    flight (a batch of that many must always be able to fill, and a photo over the limit then
    runs alone); `release` returns them. After `close()` every waiting or later acquire raises
    PipelineClosed."""

    def __init__(self, limit: int, min_count: int = 1) -> None:
        self.limit, self.min_count = limit, min_count
        self.pixels = self.count = self.waiting = 0
        self.closed = False
        self._changed = threading.Condition()

    def admits(self, pixels: int) -> bool:
        return self.count < self.min_count or self.pixels + pixels <= self.limit

    def acquire(self, pixels: int) -> None:
        with self._changed:
            self.waiting += 1
            try:
                self._changed.wait_for(lambda: self.closed or self.admits(pixels))
            finally:
                self.waiting -= 1
            if self.closed:
                raise PipelineClosed
            self.pixels += pixels
            self.count += 1

    def release(self, pixels: int) -> None:
        with self._changed:
            self.pixels -= pixels
            self.count -= 1
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()


@dataclass
class Loaded:
    """A decoded photo with its network input, on its way through colorize's pipeline."""
    dest: Path
    image: Image.Image
    L: torch.Tensor
    h: int
    w: int
    seed: int
    pixels: int


def colorize_files(opts: ColorizeOptions, exported: GeneratorExport, device: torch.device,
                   files: list[tuple[Path, Path]]) -> tuple[int, dict[str, int]]:
    """Load, batch (same network input size), predict and write `files` (from find_inputs);
    (images written, skip counts). Three stages overlap, each photo's results the same as alone
    (docs/design.md, "Colorize memory"): a thread decodes the next photos and makes their
    network input, this thread runs the network (on half the cores when there are several
    photos), and one thread per core colours, encodes and writes; a PixelBudget bounds the
    decoded pixels in flight."""
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
    budget = PixelBudget(PIPELINE_PIXELS, batch_size)
    loaded: queue.Queue[Loaded | BaseException | None] = queue.Queue()
    bar = tqdm(total=len(files), unit="img", dynamic_ncols=True,
               disable=not opts.progress or len(files) < PROGRESS_MIN_FILES)

    def load(path: Path, relative: Path) -> Loaded | None:
        pixels = 0

        def reserve(n: int) -> None:
            nonlocal pixels
            budget.acquire(n)
            pixels = n

        image = None
        try:
            image = load_image(path, opts.max_pixels, before_decode=reserve)
            L, h, w = network_input(image, exported, device)
        except (Skip, GeometryError) as exc:
            if image is not None:
                image.close()
            if pixels:
                budget.release(pixels)
            skipped[exc.reason if isinstance(exc, Skip) else "too_thin"] += 1
            # One line, whatever the name.
            tqdm.write(f"skipped {display_name(str(path))}: {exc}", file=sys.stderr)
            bar.update()
            return None
        return Loaded(output_name(relative, suffix, used), image, L, h, w,
                      image_seed(str(relative)), pixels)

    def load_all() -> None:  # the loader thread
        try:
            with one_cpu_thread(torch.device("cpu")):
                for path, relative in files:
                    if budget.closed:
                        return
                    if (item := load(path, relative)) is not None:
                        loaded.put(item)
        except BaseException as exc:  # raised again in the network thread
            loaded.put(exc)
        else:
            loaded.put(None)

    def in_order() -> Iterator[Loaded]:
        while (item := loaded.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def finish(item: Loaded, ab: torch.Tensor) -> None:  # a worker thread
        try:
            image = colorized(item.image, ab)
            data = encoded(image, opts.format, opts.quality)
            image.close()
            write_output(opts.output / item.dest, opts.output, data)
        finally:
            budget.release(item.pixels)
            bar.update()

    threads = torch.get_num_threads()
    if device.type == "cpu" and len(files) > 1:
        # Half the cores for the network, the others colour, encode and decode other photos
        # beside it. On 2 cores, 17 photos (JPEG out): 14 s this way, 32 s with both threads on
        # the network while other jobs loaded the machine (its barriers wait for cores that the
        # other stages hold); 7.0-7.7 s against 6.9-8.3 s on a quiet one. A pool of networks,
        # one thread each, was no faster. One photo gets every core.
        torch.set_num_threads(max(1, threads // 2))
    workers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="colorize")
    loader = threading.Thread(target=load_all, name="colorize-load", daemon=True)
    loader.start()
    pending: list[Future[None]] = []
    written = 0
    try:
        for _, same_size in itertools.groupby(in_order(), key=lambda item: item.L.shape):
            while batch := list(itertools.islice(same_size, batch_size)):
                ab = predict_ab(generator, torch.cat([item.L for item in batch]), mode,
                                [item.seed for item in batch])
                written += len(batch)
                pending += [workers.submit(finish, item, one[:, :item.h, :item.w])
                            for item, one in zip(batch, ab)]
                for future in [f for f in pending if f.done()]:  # an error stops colorize now
                    pending.remove(future)
                    future.result()
        for future in pending:
            future.result()
    finally:
        budget.close()
        workers.shutdown(wait=True, cancel_futures=True)
        loader.join()
        bar.close()
        torch.set_num_threads(threads)  # also the default that the loader's one_cpu_thread sets
    return written, dict(skipped)


def network_input(image: Image.Image, exported: GeneratorExport, device: torch.device
                  ) -> tuple[torch.Tensor, int, int]:
    """A decoded photo's network input (inference.model_input_rows), read a strip at a time."""
    return model_input_rows(image_rows(image), image.height, image.width, exported.settings,
                            2 ** exported.generator.num_downs, device)


def encoded(image: Image.Image, fmt: str, quality: int) -> bytes:
    """The output file's bytes (PNG ignores `quality`)."""
    data = io.BytesIO()
    image.save(data, format=fmt, quality=quality)
    return data.getvalue()


def write_output(target: Path, output: Path, data: bytes) -> None:
    """Atomically write `data` to `target`, a path below the folder `output`; refuses a target
    whose folder leads outside it (a symbolic link in the output tree)."""
    # Checked before mkdir, which would otherwise create folders behind the link.
    if not target.parent.resolve().is_relative_to(output.resolve()):
        raise CliError(f"{target.parent} leads outside --output {output} "
                       f"(a symbolic link?); refusing to write there")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, data)


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
