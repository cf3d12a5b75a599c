"""COCO-like data without a download: distinct 640x480 JPEGs of scikit-image photos, as shards."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import BenchError
from ..shard_format import MANIFEST

SYNTH_SIZE = (640, 480)  # COCO's most common size
SYNTH_QUALITY = 90
SYNTH_STAMP = "bench-synthetic.json"


def source_photos() -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled colour photographs (no network needed), as HxWx3 uint8 arrays."""
    import skimage.data as data

    left, right, _ = data.stereo_motorcycle()
    photos = [("astronaut", data.astronaut()), ("chelsea", data.chelsea()),
              ("coffee", data.coffee()), ("rocket", data.rocket()),
              ("motorcycle_left", left), ("motorcycle_right", right),
              ("hubble_deep_field", data.hubble_deep_field()),
              ("ihc", data.immunohistochemistry()), ("retina", data.retina())]
    return [(name, np.ascontiguousarray(img[..., :3])) for name, img in photos]


def _synthetic_jpeg(photo: np.ndarray, rng: np.random.Generator) -> bytes:
    """A random 4:3 window of `photo` (40-100% of the largest one) resized to SYNTH_SIZE, flipped
    at random, with a mild per-channel gain, encoded: real photo content, so JPEG decode
    costs what it costs on COCO, and every image differs."""
    from PIL import Image

    h, w = photo.shape[:2]
    aspect = SYNTH_SIZE[0] / SYNTH_SIZE[1]
    max_w = min(w, h * aspect)
    win_w = max_w * rng.uniform(0.4, 1.0)
    win_h = win_w / aspect
    x0, y0 = rng.uniform(0, w - win_w), rng.uniform(0, h - win_h)
    im = Image.fromarray(photo).resize(SYNTH_SIZE, Image.Resampling.BICUBIC,
                                       box=(x0, y0, x0 + win_w, y0 + win_h))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.9, 1.1, size=3)
    img = np.clip(np.asarray(im, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=SYNTH_QUALITY)
    return buf.getvalue()


def make_synthetic_jpegs(out_dir: Path, n: int, *, seed: int = 0,
                         workers: int | None = None) -> list[Path]:
    """Write `n` distinct COCO-like JPEGs into `out_dir`; deterministic."""
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = source_photos()

    def one(i: int, *attempt: int) -> bytes:
        rng = np.random.default_rng([seed, i, *attempt])
        return _synthetic_jpeg(photos[i % len(photos)][1], rng)

    # PIL releases the GIL while resizing and encoding, so threads scale.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        blobs = list(pool.map(one, range(n)))
    seen: set[str] = set()
    paths = []
    for i, blob in enumerate(blobs):
        attempt = 0
        while (digest := hashlib.sha256(blob).hexdigest()) in seen:  # astronomically rare
            attempt += 1
            blob = one(i, attempt)
        seen.add(digest)
        path = out_dir / f"{photos[i % len(photos)][0]}-{i:06d}.jpg"
        path.write_bytes(blob)
        paths.append(path)
    return paths


def ensure_synthetic_shards(cache: Path, n: int, *, seed: int, workers: int) -> Path:
    """The synthetic set as shards in `cache`, built once and reused while it matches.

    A stamp file marks the folder as the benchmark's (so only then is it ever replaced) and
    records what it holds; it says `complete` only after the shard writer wrote its manifest."""
    from ..shards import ShardError, ShardOptions, build_shards

    wanted = {"images": n, "size": list(SYNTH_SIZE), "quality": SYNTH_QUALITY, "seed": seed}
    stamp_path = cache / SYNTH_STAMP
    stamp = None
    if stamp_path.exists():
        with contextlib.suppress(ValueError, OSError):
            stamp = json.loads(stamp_path.read_text())
        if stamp == {**wanted, "complete": True} and (cache / MANIFEST).exists():
            print(f"reusing synthetic shards in {cache}", flush=True)
            return cache
        shutil.rmtree(cache)  # ours, but another set or an interrupted build
    elif cache.exists() and any(cache.iterdir()):
        raise BenchError(f"--cache {cache} is not empty and was not written by the benchmark; "
                         f"choose another folder")

    print(f"building {n} synthetic {SYNTH_SIZE[0]}x{SYNTH_SIZE[1]} JPEGs -> {cache}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps({**wanted, "complete": False}) + "\n")
    jpegs = cache.with_name(cache.name + ".jpegs")
    shutil.rmtree(jpegs, ignore_errors=True)
    try:
        make_synthetic_jpegs(jpegs, n, seed=seed, workers=workers)
        build_shards(ShardOptions(source=jpegs, output=cache, val_fraction=0.0,
                                  shard_size="256MB", seed=seed, workers=workers,
                                  progress=False))
    except ShardError as exc:
        raise BenchError(f"building the synthetic shards failed: {exc}") from None
    finally:
        shutil.rmtree(jpegs, ignore_errors=True)
    if not (cache / MANIFEST).exists():
        raise BenchError(f"the shard writer left no {MANIFEST} in {cache}")
    atomic_write(stamp_path, json.dumps({**wanted, "complete": True}) + "\n")
    return cache
