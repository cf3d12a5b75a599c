"""Find the tar shards of one split and count their samples.

A shard folder holds `{split}-NNNNNN.tar`, DALI index files `{split}-NNNNNN.idx` and
`manifest.json` (see pix2pix_dist.shards). The manifest is the source of truth when present;
without it the tars are globbed and counted from their index files (first line `v1.2 <n>`),
or by walking the tar when there is no index.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

MANIFEST_FORMAT = "pix2pix_dist-shards/1"


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
    manifest = root / "manifest.json"
    if not manifest.is_file() and (root / "progress.json").is_file():
        # The writer removes the manifest while it works and writes it last.
        raise DataError(f"the shards in {root} are incomplete (an interrupted or running "
                        f"`make shards`); run the same command again to finish them")
    shards = _from_manifest(manifest, split) if manifest.is_file() else _from_glob(root, split)
    if not shards:
        raise DataError(f"no {split} shards in {root} (expected manifest.json or {split}-*.tar); "
                        f"write them with `make shards`")
    return ShardSet(root, split, tuple(shards))


def _from_manifest(manifest: Path, split: str) -> list[Shard]:
    try:
        data = json.loads(manifest.read_text())
        entries = data["splits"].get(split, {}).get("shards", []) if "splits" in data else None
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise DataError(f"cannot read {manifest}: {exc}") from None
    if entries is None or data.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{manifest} is not a {MANIFEST_FORMAT} manifest; rewrite with `make shards`")
    shards = []
    for entry in entries:
        try:
            tar, samples = manifest.parent / entry["tar"], int(entry["samples"])
            index = manifest.parent / entry["index"] if entry.get("index") else None
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DataError(f"{manifest} has a malformed shard entry {entry!r}; "
                            f"rewrite the shards with `make shards`") from None
        if not tar.is_file():
            raise DataError(f"{manifest} lists {entry['tar']} but {tar} is missing; "
                            f"rewrite the shards with `make shards`")
        shards.append(Shard(tar, index if index and index.is_file() else None, samples))
    return shards


def _from_glob(root: Path, split: str) -> list[Shard]:
    shards = []
    for tar in sorted(root.glob(f"{split}-*.tar")):
        index = tar.with_suffix(".idx")
        if index.is_file():
            shards.append(Shard(tar, index, _count_from_index(index)))
        else:
            shards.append(Shard(tar, None, count_tar_samples(tar)))
    return shards


def _count_from_index(index: Path) -> int:
    with index.open() as f:
        header = f.readline().split()
    if len(header) != 2 or not header[1].isdigit():
        raise DataError(f"{index} is not a DALI index (first line should be 'v1.2 <samples>')")
    return int(header[1])


def sample_key(member_name: str) -> str:
    """The sample a tar member belongs to: its path up to the first dot of the file name
    (the rule shared by webdataset and DALI)."""
    folder, _, name = member_name.rpartition("/")
    return f"{folder}/{name.split('.', 1)[0]}" if folder else name.split(".", 1)[0]


def count_tar_samples(tar: Path) -> int:
    """Samples in a tar without an index: runs of members sharing a key."""
    count, last = 0, None
    try:
        with tarfile.open(tar) as tf:
            for member in tf:
                if member.isfile() and not member.name.rpartition("/")[2].startswith("."):
                    key = sample_key(member.name)
                    count += key != last
                    last = key
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"cannot read shard {tar}: {exc}") from None
    return count
