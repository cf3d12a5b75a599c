"""`verify_shards`: re-read an output folder and report every problem found (empty list = good).

Checks, per shard: the tar exists with the recorded size and sha256; its index exists, matches
its recorded sha256 and equals the index recomputed from the tar's headers; each sample has
exactly one .jpg and one .json whose key matches; the JPEG decodes to RGB at the size the JSON
records. Across shards: keys are unique, counts add up to the manifest, no stray shard files.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from .build import FORMAT, MANIFEST, SHARD_FILE, SPLITS
from .index import component, render_index
from .pool import worker_signals
from .writer import file_sha256


def _check_jpeg(data: bytes, meta: dict[str, Any]) -> str | None:
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG":
            return f"image is {im.format}, not JPEG"
        if im.mode != "RGB":
            return f"image mode is {im.mode}, not RGB"
        if im.size != (meta.get("width"), meta.get("height")):
            return f"image is {im.size[0]}x{im.size[1]}, metadata says {meta.get('width')}x{meta.get('height')}"
        # DCT-scaled decode: the whole entropy-coded stream is still parsed, at a fraction of the cost.
        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
    except Exception as e:
        return f"JPEG does not decode: {e}"
    return None


def _verify_shard(out: Path, rec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, keys) of one shard."""
    name = rec.get("tar", "?")
    tar, idx = out / name, out / rec.get("index", "?")
    problems: list[str] = []
    if not tar.is_file():
        return [f"{name}: missing"], []
    if tar.stat().st_size != rec.get("bytes"):
        problems.append(f"{name}: size {tar.stat().st_size} != manifest {rec.get('bytes')}")
    if file_sha256(tar) != rec.get("sha256"):
        problems.append(f"{name}: sha256 does not match the manifest")
    keys: list[str] = []
    index: list[list[str]] = []
    pending: dict[str, bytes] = {}
    try:
        # One pass over the tar: rebuild its index from the headers and check each sample
        # as soon as the next one starts (samples are contiguous), so memory stays at one sample.
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    problems.append(f"{name}: unexpected member {m.name}")
                    continue
                key, _, ext = m.name.partition(".")
                if not keys or keys[-1] != key:
                    if keys:
                        problems.extend(_check_sample(name, keys[-1], pending))
                    keys.append(key)
                    index.append([])
                    pending = {}
                index[-1].append(component(ext, m.offset_data, m.size, m.name))
                f = tf.extractfile(m)
                pending[ext] = f.read() if f else b""
        if keys:
            problems.extend(_check_sample(name, keys[-1], pending))
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{name}: unreadable tar ({e})")
    if not idx.is_file():
        problems.append(f"{idx.name}: missing")
    else:
        if "index_sha256" in rec and file_sha256(idx) != rec["index_sha256"]:
            problems.append(f"{idx.name}: sha256 does not match the manifest")
        if idx.read_bytes() != render_index(index):
            problems.append(f"{idx.name}: does not match the member offsets of {name}")
    if len(keys) != rec.get("samples"):
        problems.append(f"{name}: {len(keys)} samples, manifest says {rec.get('samples')}")
    return problems, keys


def _check_sample(shard: str, key: str, files: dict[str, bytes]) -> list[str]:
    where = f"{shard}: sample {key}"
    if set(files) != {"jpg", "json"}:
        return [f"{where}: has {sorted(files)}, expected ['jpg', 'json']"]
    try:
        meta = json.loads(files["json"])
    except ValueError:
        return [f"{where}: metadata is not valid JSON"]
    if meta.get("key") != key:
        return [f"{where}: metadata key is {meta.get('key')!r}"]
    problem = _check_jpeg(files["jpg"], meta)
    return [f"{where}: {problem}"] if problem else []


def _verify_job(job: tuple[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    return _verify_shard(Path(job[0]), job[1])


def verify_shards(output: Path, workers: int | None = None) -> list[str]:
    """Re-read every shard and index under `output`; return problems (empty list = all good)."""
    out = Path(output)
    if not out.is_dir():
        return [f"{out}: no such folder"]
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return [f"{out / MANIFEST}: missing (no finished build here)"]
    except ValueError as e:
        return [f"{out / MANIFEST}: not valid JSON ({e})"]
    problems: list[str] = []
    if manifest.get("format") != FORMAT:
        problems.append(f"{MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    splits = manifest.get("splits", {})
    jobs = [(str(out), rec) for s in SPLITS for rec in splits.get(s, {}).get("shards", [])]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    if workers > 1:
        with mp.get_context().Pool(workers, worker_signals) as pool:
            results = pool.map(_verify_job, jobs, chunksize=1)
    else:
        results = [_verify_job(j) for j in jobs]
    seen: dict[str, str] = {}
    for (_, rec), (probs, keys) in zip(jobs, results):
        problems.extend(probs)
        for k in keys:
            if k in seen:
                problems.append(f"{rec['tar']}: key {k} also in {seen[k]}")
            seen[k] = rec["tar"]
    for s in SPLITS:
        info = splits.get(s, {})
        total = sum(r.get("samples", 0) for r in info.get("shards", []))
        if info and info.get("samples") != total:
            problems.append(f"{MANIFEST}: {s} samples {info.get('samples')} != sum over its shards {total}")
    listed = {r[k] for _, r in jobs for k in ("tar", "index") if k in r}
    for p in sorted(out.iterdir()):
        if SHARD_FILE.match(p.name) and p.name not in listed:
            problems.append(f"{p.name}: not listed in {MANIFEST}")
    return problems
