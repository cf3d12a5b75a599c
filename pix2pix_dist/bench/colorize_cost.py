"""Colorize's cost as photos grow: seconds and peak resident memory per photo size.

Each size runs `pix2pix-colorize` in a fresh process (peak RSS is per process): the process
records its resident memory after the imports, colorizes one JPEG of that size with a
freshly initialised generator of the benchmark's architecture, and reports the wall time of the
call and its peak RSS (VmHWM). The speed of colorize itself belongs to pix2pix_dist/colorize.py
and inference.py; this only measures it.

    python -m pix2pix_dist.bench.colorize_cost PHOTO EXPORT DEVICE RESULT.json   (run by the bench)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..config import Config
from .point import PACKAGE_ROOT


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def make_photo(path: Path, megapixels: float) -> tuple[int, int]:
    """A 4:3 JPEG (quality 90) of about `megapixels`, from a scikit-image photo: real content, so
    decoding costs what a camera photo's does."""
    import numpy as np
    import skimage.data
    from PIL import Image

    width = max(16, round(math.sqrt(megapixels * 1e6 * 4 / 3)))
    height = max(16, round(width * 3 / 4))
    im = Image.fromarray(np.ascontiguousarray(skimage.data.coffee())).resize(
        (width, height), Image.Resampling.BICUBIC)
    im.save(path, format="JPEG", quality=90)
    return width, height


def write_export(cfg: Config, path: Path) -> Path:
    """A freshly initialised generator of `cfg`'s architecture, exported (colorize's input)."""
    import torch

    from ..export import export_generator, generator_meta
    from ..models import UNetGenerator, init_weights

    torch.manual_seed(0)
    generator = UNetGenerator(**generator_meta(cfg, 0)["model"])
    init_weights(generator)
    export_generator(generator, path, generator_meta(cfg, 0))
    return path


def measure_colorize(cfg: Config, megapixels: list[float], device: str,
                     timeout: float) -> list[dict[str, Any]]:
    """Seconds, megapixels/s and peak RSS of colorizing one photo of each size, each in its own
    process; a size that fails is one line in its entry ("error")."""
    points = []
    with tempfile.TemporaryDirectory(prefix="bench-colorize-") as tmp:
        work = Path(tmp)
        export = write_export(cfg, work / "generator.safetensors")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        for mp in megapixels:
            print(f"measuring colorize: {mp:g} MP ...", flush=True)
            photo = work / f"photo-{mp:g}mp.jpg"
            width, height = make_photo(photo, mp)
            result = work / "result.json"
            result.unlink(missing_ok=True)
            entry: dict[str, Any] = {"megapixels": width * height / 1e6, "size": [width, height]}
            try:
                proc = subprocess.run([sys.executable, "-m", "pix2pix_dist.bench.colorize_cost",
                                       str(photo), str(export), device, str(result)],
                                      capture_output=True, text=True, env=env, timeout=timeout,
                                      stdin=subprocess.DEVNULL)
                if proc.returncode == 0 and result.exists():
                    entry.update(json.loads(result.read_text()))
                    entry["megapixels_per_s"] = entry["megapixels"] / entry["seconds"]
                else:
                    lines = (proc.stderr or proc.stdout).strip().splitlines()
                    entry["error"] = lines[-1][:300] if lines else f"exit code {proc.returncode}"
            except subprocess.TimeoutExpired:
                entry["error"] = f"did not finish within {timeout:g} s"
            points.append(entry)
    return points


def main(argv: list[str]) -> int:
    """The child: colorize one photo, then write its seconds and memory."""
    photo, export, device, result = argv
    from ..colorize import main as colorize_main

    rss_before = _status_mib("VmRSS")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        rc = colorize_main([photo, "--generator", export, "--output", out, "--device", device])
        seconds = time.perf_counter() - start
    if rc != 0:
        return rc
    atomic_write(Path(result), json.dumps({"seconds": seconds, "rss_before_mib": rss_before,
                                           "peak_rss_mib": _status_mib("VmHWM")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
