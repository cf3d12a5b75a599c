"""Find the tar shards of each split and count their samples (format: pix2pix_dist.shard_format).

The manifest is the source of truth when present; without it (shards from another tool) the
tars are listed by name and counted from their index files, or by walking the tar.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, warn
from ..shard_format import (MANIFEST, PROGRESS, SPLITS, ManifestError, index_name,
                            index_sample_count, is_shard_tar, load_manifest, manifest_records,
                            tar_sample_count)


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


@dataclass(frozen=True)
class Splits:
    """The splits found under `root` (find_splits): `splits["train"]`, `splits.for_eval()`."""
    root: Path
    found: dict[str, ShardSet]

    def __getitem__(self, split: str) -> ShardSet:
        if split not in self.found:
            raise DataError(f"no {split} shards in {self.root} (expected {MANIFEST} or "
                            f"{split}-*.tar); write them with `make shards`")
        return self.found[split]

    def for_eval(self) -> ShardSet:
        """The split the training loop's sample grids and evaluation read: val, or, for shards
        written without one, train, announced (the scores are then on training data). The one
        place that falls back; a val split listed but damaged was refused by find_splits."""
        if "val" in self.found:
            return self.found["val"]
        warn(f"{self.root} has no val split; the sample grids and eval.every use train images "
             f"(scores on training data)")
        return self["train"]


def find_splits(root: str | Path, splits: Iterable[str] = SPLITS) -> Splits:
    """The shards of each of `splits` under `root`, in reading order, the manifest read once.
    DataError when a shard the manifest lists is missing, not a regular file or truncated: a
    damaged split is never taken for an absent one."""
    root = Path(root)
    # exists(), not is_file(): a manifest that is a FIFO is an error (load_manifest), not absent.
    has_manifest = os.path.lexists(root / MANIFEST)
    if not has_manifest and (root / PROGRESS).exists():
        # The writer removes the manifest while it works and writes it last.
        raise DataError(f"the shards in {root} are incomplete (an interrupted or running "
                        f"`make shards`); run the same command again to finish them")
    found = _from_manifest(root, splits) if has_manifest else {
        split: _from_listing(root, split) for split in splits}
    return Splits(root, {split: ShardSet(root, split, tuple(shards))
                         for split, shards in found.items() if shards})


def find_shards(root: str | Path, split: str) -> ShardSet:
    """The shards of `split` under `root`, in reading order; DataError if there are none."""
    return find_splits(root, [split])[split]


def _from_manifest(root: Path, splits: Iterable[str]) -> dict[str, list[Shard]]:
    try:
        manifest = load_manifest(root)
    except ManifestError as e:
        raise DataError(f"{e}; rewrite the shards with `make shards`") from None
    # A split the manifest does not name at all has no shards (hand-written manifests).
    named = manifest.get("splits") if isinstance(manifest, dict) else None
    splits = [s for s in splits if not isinstance(named, dict) or s in named]
    records, problems = manifest_records(manifest, splits)
    if problems:
        raise DataError(f"{root / MANIFEST} is malformed ({problems[0]}); rewrite the shards with `make shards`")
    shards: dict[str, list[Shard]] = {split: [] for split in splits}
    for split, rec in records:
        tar, index = root / rec["tar"], root / rec["index"]
        if not tar.is_file():
            raise DataError(f"{root / MANIFEST} lists {rec['tar']} but {tar} is missing (or not a regular file); "
                            f"rewrite the shards with `make shards`")
        size = tar.stat().st_size
        if size != rec["bytes"]:  # a stat per shard: caught here, before any worker or pipeline starts
            raise DataError(f"{tar} is {size} bytes, {MANIFEST} says {rec['bytes']}: truncated or changed "
                            f"after writing; rewrite the shards with `make shards`")
        shards[split].append(Shard(tar, index if index.is_file() else None, rec["samples"]))
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
