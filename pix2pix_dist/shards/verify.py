"""`verify_shards`: re-read an output folder and report every problem found (empty list = good).

Checks, per shard: the tar exists with the recorded size and sha256; its index exists, matches
its recorded sha256 and equals the index recomputed from the tar's headers; each sample has
exactly one .jpg and one .json whose key matches; the JPEG decodes to RGB at the size the JSON
records. Across shards: keys are unique, counts add up to the manifest, no stray shard files.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import ShardError
from ..shard_format import (MANIFEST, SHARD_FILE, ManifestError, group_samples, load_manifest,
                             manifest_records, render_index, sample_entry, split_name)
from .pool import WorkerDied, WorkerPool
from ..atomic import file_sha256
from ..files import open_regular, read_bytes


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
    """(problems, keys) of one shard; `rec` was checked by `manifest_records`."""
    name = rec["tar"]
    tar, idx = out / name, out / rec["index"]
    problems: list[str] = []
    if not tar.is_file():
        return [f"{name}: missing"], []
    if tar.stat().st_size != rec["bytes"]:
        problems.append(f"{name}: size {tar.stat().st_size} != manifest {rec['bytes']}")
    if file_sha256(tar) != rec["sha256"]:
        problems.append(f"{name}: sha256 does not match the manifest")
    keys: list[str] = []
    index: list[list[str]] = []
    try:
        # One pass over the tar: rebuild its index from the headers (the same grouping as
        # wds2idx) and check each sample as it comes, so memory stays at one sample.
        with open_regular(tar) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for key, members in group_samples(_reported_others(tf, name, problems)):
                keys.append(key)
                index.append(sample_entry(members))
                # Regular files only (group_samples): extractfile never returns None for them.
                files = [(split_name(m.name)[1], tf.extractfile(m).read()) for m in members]
                problems.extend(_check_sample(name, key, files))
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{name}: unreadable tar ({e})")
    if not idx.is_file():
        problems.append(f"{idx.name}: missing")
    else:
        if "index_sha256" in rec and file_sha256(idx) != rec["index_sha256"]:
            problems.append(f"{idx.name}: sha256 does not match the manifest")
        if read_bytes(idx) != render_index(index):
            problems.append(f"{idx.name}: does not match the member offsets of {name}")
    if len(keys) != rec["samples"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {rec['samples']}")
    return problems, keys


def _reported_others(members: Iterable[tarfile.TarInfo], shard: str, problems: list[str]) -> Iterator[tarfile.TarInfo]:
    """Pass members through, reporting those that are no sample file (the grouping skips them)."""
    for m in members:
        key = split_name(m.name)[0]
        if not m.isreg() or not key or "/" in m.name:
            problems.append(f"{shard}: unexpected member {m.name}")
        yield m


def _check_sample(shard: str, key: str, files: list[tuple[str, bytes]]) -> list[str]:
    where = f"{shard}: sample {key}"
    exts = sorted(ext for ext, _ in files)
    if exts != ["jpg", "json"]:
        return [f"{where}: has {exts}, expected ['jpg', 'json']"]
    data = dict(files)
    try:
        meta = json.loads(data["json"])
    except ValueError:
        return [f"{where}: metadata is not valid JSON"]
    if not isinstance(meta, dict) or meta.get("key") != key:
        return [f"{where}: metadata key is {meta.get('key') if isinstance(meta, dict) else None!r}"]
    problem = _check_jpeg(data["jpg"], meta)
    return [f"{where}: {problem}"] if problem else []


def _verify_all(out: Path, records: list[dict[str, Any]], workers: int
                ) -> list[tuple[list[str], list[str]]]:
    verify = partial(_verify_shard, out)
    if workers <= 1:
        return [verify(rec) for rec in records]
    pool = WorkerPool(verify, workers)
    try:
        return list(pool.map(records))
    except WorkerDied as e:
        what = e.job["tar"] if e.job else "the shards"
        raise ShardError(f"a worker process died (out of memory?) while verifying {what}; "
                         f"run again, or with --workers 1") from None
    finally:
        pool.close(terminate=True)  # every result was read, or we failed: nothing to wait for


def verify_shards(output: Path, workers: int | None = None) -> list[str]:
    """Re-read every shard and index under `output`; return problems (empty list = all good)."""
    out = Path(output)
    if not out.is_dir():
        return [f"{out}: no such folder"]
    try:
        manifest = load_manifest(out)
    except ManifestError as e:
        return [str(e)]
    split_records, problems = manifest_records(manifest)
    records = [rec for _, rec in split_records]
    results = _verify_all(out, records, min(workers or os.cpu_count() or 1, max(1, len(records))))
    seen: dict[str, str] = {}
    for rec, (probs, keys) in zip(records, results):
        problems.extend(probs)
        for k in keys:
            if k in seen:
                problems.append(f"{rec['tar']}: key {k} also in {seen[k]}")
            seen[k] = rec["tar"]
    listed = {r[k] for r in records for k in ("tar", "index")}
    for p in sorted(out.iterdir()):
        if SHARD_FILE.match(p.name) and p.name not in listed:
            problems.append(f"{p.name}: not listed in {MANIFEST}")
    return problems
