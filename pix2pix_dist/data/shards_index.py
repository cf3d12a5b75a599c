"""Find the tar shards of one split and count their samples (format: pix2pix_dist.shard_format).

The manifest is the source of truth when present; without it (shards from another tool) the
tars are listed by name and counted from their index files, or by walking the tar.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..shard_format import (MANIFEST, PROGRESS, ManifestError, index_name, index_sample_count,
                            is_shard_tar, load_manifest, manifest_records, tar_sample_count)
from .errors import DataError


@dataclass(frozen=True)
class Shard:
    tar: Path
    index: Path | None
    """DALI index file; None makes DALI parse the tar at start-up."""
    samples: int


@dataclass(frozen=True)
class ShardSet:
    root: Path
    split: str
    shards: tuple[Shard, ...]

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)


def find_shards(root: str | Path, split: str) -> ShardSet:
    """The shards of `split` under `root`, in reading order; DataError if there are none."""
    root = Path(root)
    # exists(), not is_file(): a manifest that is a FIFO is an error (load_manifest), not absent.
    has_manifest = os.path.lexists(root / MANIFEST)
    if not has_manifest and (root / PROGRESS).exists():
        # The writer removes the manifest while it works and writes it last.
        raise DataError(f"the shards in {root} are incomplete (an interrupted or running "
                        f"`make shards`); run the same command again to finish them")
    shards = _from_manifest(root, split) if has_manifest else _from_listing(root, split)
    if not shards:
        raise DataError(f"no {split} shards in {root} (expected {MANIFEST} or {split}-*.tar); "
                        f"write them with `make shards`")
    return ShardSet(root, split, tuple(shards))


def _from_manifest(root: Path, split: str) -> list[Shard]:
    try:
        records, problems = manifest_records(load_manifest(root), [split])
    except ManifestError as e:
        raise DataError(f"{e}; rewrite the shards with `make shards`") from None
    if problems:
        raise DataError(f"{root / MANIFEST} is malformed ({problems[0]}); rewrite the shards with `make shards`")
    shards = []
    for _, rec in records:
        tar, index = root / rec["tar"], root / rec["index"]
        if not tar.is_file():
            raise DataError(f"{root / MANIFEST} lists {rec['tar']} but {tar} is missing (or not a regular file); "
                            f"rewrite the shards with `make shards`")
        size = tar.stat().st_size
        if size != rec["bytes"]:  # a stat per shard: caught here, before any worker or pipeline starts
            raise DataError(f"{tar} is {size} bytes, {MANIFEST} says {rec['bytes']}: truncated or changed "
                            f"after writing; rewrite the shards with `make shards`")
        shards.append(Shard(tar, index if index.is_file() else None, rec["samples"]))
    return shards


def _from_listing(root: Path, split: str) -> list[Shard]:
    if not root.is_dir():
        return []
    shards = []
    for tar in sorted(p for p in root.iterdir() if is_shard_tar(p.name, split)):
        index = tar.with_name(index_name(tar.name))
        try:
            count = index_sample_count(index) if index.is_file() else tar_sample_count(tar)
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"cannot read shard {tar}: {exc}") from None
        if count is None:
            raise DataError(f"{index} is not a DALI index (first line should be 'v1.2 <samples>')")
        shards.append(Shard(tar, index if index.is_file() else None, count))
    return shards
