"""Full-resolution colorize against its floor: decoding each photo and encoding an output of the
same size, alone, on the same files, in one run; and colorize's peak memory per megapixel.

    python -m pix2pix_dist.bench.colorize_speed                 # PNG out
    python -m pix2pix_dist.bench.colorize_speed --format jpeg --sizes 24,56

Interleaved and repeated (the minimum of `--repeat` tries is kept, so a busy machine shifts both
sides alike). `floor` = decode (the file into a PIL image) + encode (RGB, the output format) +
atomic write, one photo after another on one thread. Per photo (`--sizes`): colorize's per-file
work alone (the calls colorize_files makes), split into its stages: decode, network input,
network, full-resolution colour, encode + write. The whole set (`--set-sizes`, by default like
the issue's 17 photos of 68 MP with one of 18 MP): `colorize_files` itself, i.e.
pix2pix-colorize's wall time on the folder with its stages overlapping, against the sum of the
floors. Peak RSS: `pix2pix-colorize` on each photo, and on the set, in a fresh process
(ru_maxrss), minus nothing: what a user's process reaches, imports included.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..atomic import atomic_write
from ..cli import CliError, parse
from ..errors import run_main
from ..imageio import load_image


@dataclass
class ColorizeBenchSettings:
    sizes: str = "0.3,1,4,24"
    """Photo sizes in megapixels, one row each (3:2 photos made from scikit-image's astronaut,
    with noise)."""
    set_sizes: str = "17.9,5,4.5,4,4,4,4,4,4,3,3,3,3,2,2,1,0.3"
    """Sizes of the photos of the whole-set row (empty: no such row)."""
    format: Literal["png", "jpeg"] = "png"
    """Output format (colorize's default: png)."""
    generator: str | None = None
    """A generator export; default: a freshly initialised generator of the default recipe
    (unet_256 at crop 256; the weights do not change the time)."""
    repeat: int = 2
    """Tries per photo and side; the minimum is reported."""
    cache: str = "benchmarks/colorize-photos"
    """Folder for the generated photos (reused)."""
    memory: bool = True
    """Also measure peak RSS per photo (a pix2pix-colorize process each)."""


def make_photo(folder: Path, megapixels: float, seed: int = 0) -> Path:
    """A 3:2 JPEG (quality 90) of about `megapixels`, textured like a photo (noise on an
    upscaled picture), generated once."""
    from PIL import Image
    from skimage import data as skdata

    width = int(round((megapixels * 1e6 * 1.5) ** 0.5))
    height = int(round(width / 1.5))
    path = folder / (f"photo-{width}x{height}" + (f"-{seed}" if seed else "") + ".jpg")
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        big = np.asarray(Image.fromarray(skdata.astronaut()).resize((width, height), Image.BICUBIC))
        noise = np.random.default_rng(seed).normal(0, 4, big.shape[:2])[..., None]
        Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def default_export(folder: Path) -> Path:
    from ..config import build_config
    from ..export import export_generator, generator_meta
    from ..generators import build_generator
    from ..models import init_weights

    path = folder / "generator.safetensors"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        cfg = build_config(None)
        torch.manual_seed(0)
        generator = build_generator(generator_meta(cfg, 0)["model"])
        init_weights(generator)
        export_generator(generator, path, generator_meta(cfg, 0))
    return path


def photo_megapixels(photo: Path) -> float:
    """Its size from the header alone (no decode)."""
    from PIL import Image

    with Image.open(photo) as image:
        return image.width * image.height / 1e6


def floor_seconds(photo: Path, fmt: str, out: Path) -> float:
    from ..colorize import encoded

    start = time.perf_counter()
    image = load_image(photo, sys.maxsize)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    atomic_write(out / "floor", encoded(rgb, fmt, 95))
    return time.perf_counter() - start


def colorize_stages(photo: Path, fmt: str, export, out: Path) -> dict[str, float]:
    """colorize's per-file work, timed stage by stage (colorize_files runs the same calls)."""
    from ..colorize import colorized, encoded, network_input, write_output
    from ..inference import image_seed, predict_ab

    times, start = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        times[name] = now - start
        start = now

    image = load_image(photo, sys.maxsize)
    lap("decode")
    L, h, w = network_input(image, export, torch.device("cpu"))
    lap("network input")
    ab = predict_ab(export.generator, L, export.settings.norm_mode, [image_seed(photo.name)])
    lap("network")
    image = colorized(image, ab[0, :, :h, :w])
    lap("full-resolution colour")
    write_output(out / "colorized", out, encoded(image, fmt, 95))
    lap("encode + write")
    times["total"] = sum(times.values())
    return times


def colorize_set_seconds(photos: Path, fmt: str, generator: Path, export, out: Path) -> float:
    """pix2pix-colorize's own loop (colorize_files) on a folder of photos, wall time."""
    from ..colorize import ColorizeOptions, colorize_files, find_inputs

    opts = ColorizeOptions([photos], generator, output=out / "set", format=fmt, quality=95,
                           progress=False)
    files, _ = find_inputs(opts.inputs)
    start = time.perf_counter()
    written, _ = colorize_files(opts, export, torch.device("cpu"), files)
    seconds = time.perf_counter() - start
    assert written == len(files), (written, len(files))
    return seconds


def peak_rss_mib(photo: Path, generator: Path, fmt: str, out: Path) -> float:
    """Peak RSS of `python -m pix2pix_dist.colorize photo` (a file or a folder) in a fresh
    process, in MiB."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "pix2pix_dist.colorize",
                           str(photo), "--generator", str(generator), "--output", str(out),
                           "--format", fmt, "--no-progress"], capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) / 1024


def megapixel_list(text: str, option: str) -> list[float]:
    """`0.3,1,4` -> [0.3, 1.0, 4.0]; empty text: []."""
    try:
        sizes = [float(mp) for mp in text.split(",") if mp.strip()]
    except ValueError:
        sizes = []
    if text.strip() and not (sizes and all(mp > 0 for mp in sizes)):
        raise CliError(f"{option} takes positive megapixels separated by commas, e.g. 0.3,1,4; "
                       f"got {text!r}")
    return sizes


def run(s: ColorizeBenchSettings) -> dict:
    from ..export import load_export

    sizes, set_sizes = megapixel_list(s.sizes, "--sizes"), megapixel_list(s.set_sizes, "--set-sizes")
    cache = Path(s.cache)
    generator = Path(s.generator) if s.generator else default_export(cache)
    export = load_export(generator, torch.device("cpu"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for mp in sizes:
            photo = make_photo(cache, mp)
            floor, stages = [], []
            for _ in range(s.repeat):
                floor.append(floor_seconds(photo, s.format, out))
                stages.append(colorize_stages(photo, s.format, export, out))
            best = min(stages, key=lambda t: t["total"])
            megapixels = photo_megapixels(photo)
            entry = {"photo": photo.name, "megapixels": round(megapixels, 1),
                     "floor_s": min(floor), "colorize_s": best["total"],
                     "ratio": best["total"] / min(floor), "stages_s": best}
            if s.memory:
                peak = peak_rss_mib(photo, generator, s.format, out)
                entry.update(peak_rss_mib=peak, peak_rss_mib_per_mp=peak / megapixels)
            print(json.dumps(entry), flush=True)
            results.append(entry)
        whole_set = measure_set(s, set_sizes, generator, export, out) if set_sizes else None
    return {"format": s.format, "threads": torch.get_num_threads(), "generator": str(generator),
            "photos": results, "set": whole_set}


def measure_set(s: ColorizeBenchSettings, sizes: list[float], generator: Path, export,
                out: Path) -> dict:
    """The whole-set row: colorize_files on a folder of photos of `sizes` against the sum of
    their floors, interleaved, the minimum of `s.repeat` tries each."""
    folder = Path(s.cache) / ("set-" + "-".join(f"{mp:g}" for mp in sizes))
    photos = [make_photo(folder, mp, seed) for seed, mp in enumerate(sizes, 1)]
    floor, colorize = [], []
    for _ in range(s.repeat):
        floor.append(sum(floor_seconds(photo, s.format, out) for photo in photos))
        colorize.append(colorize_set_seconds(folder, s.format, generator, export, out))
    megapixels = sum(photo_megapixels(p) for p in photos)
    entry = {"photos": len(photos), "megapixels": round(megapixels, 1),
             "largest_megapixels": round(max(sizes), 1), "floor_s": min(floor),
             "colorize_s": min(colorize), "ratio": min(colorize) / min(floor)}
    if s.memory:
        peak = peak_rss_mib(folder, generator, s.format, out)
        entry.update(peak_rss_mib=peak, peak_rss_mib_per_mp=peak / max(sizes))
    print(json.dumps(entry), flush=True)
    return entry


def format_table(r: dict) -> str:
    lines = [f"colorize vs decode + encode ({r['format']} out, {r['threads']} threads, min of tries)",
             "| photo | MP | decode+encode s | colorize s | ratio | decode | net input | network "
             "| colour | encode+write | peak RSS MiB | MiB/MP |", "|" + "---|" * 12]
    for e in r["photos"]:
        st = e["stages_s"]
        lines.append(f"| {e['photo']} | {e['megapixels']} | {e['floor_s']:.2f} | {e['colorize_s']:.2f} "
                     f"| {e['ratio']:.2f}x | {st['decode']:.2f} | {st['network input']:.2f} "
                     f"| {st['network']:.2f} | {st['full-resolution colour']:.2f} "
                     f"| {st['encode + write']:.2f} | {e.get('peak_rss_mib', float('nan')):.0f} "
                     f"| {e.get('peak_rss_mib_per_mp', float('nan')):.1f} |")
    if e := r.get("set"):
        lines += ["", f"whole set: {e['photos']} photos, {e['megapixels']} MP (largest "
                      f"{e['largest_megapixels']} MP), pix2pix-colorize's own loop with its stages "
                      "overlapping against one decode + encode after another",
                  "| decode+encode s | colorize s | ratio | MP/s | peak RSS MiB | MiB per MP of the "
                  "largest |", "|---|---|---|---|---|---|",
                  f"| {e['floor_s']:.2f} | {e['colorize_s']:.2f} | {e['ratio']:.2f}x "
                  f"| {e['megapixels'] / e['colorize_s']:.2f} | {e.get('peak_rss_mib', float('nan')):.0f} "
                  f"| {e.get('peak_rss_mib_per_mp', float('nan')):.1f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        s = parse(ColorizeBenchSettings, sys.argv[1:] if argv is None else argv,
                  prog="python -m pix2pix_dist.bench.colorize_speed",
                  description=__doc__.split("\n\n")[0])
        print(format_table(run(s)))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
