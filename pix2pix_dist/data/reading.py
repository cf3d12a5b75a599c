"""Reading a split's samples straight from its tars: in order (webdataset's tar iterator),
positions [start, stop) of the concatenated split; where each sample's JPEG lies (the index
files, else the tar headers), for random access; and the first sample that does not decode.

Used by the torch backend (random access), by evaluation (val read in order) and by the DALI
backend to name the culprit after a DALI error.
"""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from webdataset import tariterators

from ..errors import DataError
from ..shard_format import group_samples, parse_index, split_name
from .geometry import decode
from .shards_index import Shard, ShardSet


class DamagedShard(DataError):
    """A tar that cannot be read to its end (truncated, overwritten): no sample can be trusted."""

    def __init__(self, tar: Path, exc: BaseException) -> None:
        # webdataset appends the open file and the url to the exception's args: keep the reason.
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        super().__init__(f"{tar.name} is damaged ({reason})")


def split_segments(shards: ShardSet, start: int, stop: int) -> Iterator[tuple[Shard, int, int]]:
    """Split positions [start, stop) of the concatenated split into per-tar pieces: (shard,
    first, end), sample numbers [first, end) inside its tar."""
    offset = 0
    for shard in shards.shards:
        lo, hi = max(start, offset), min(stop, offset + shard.samples)
        if lo < hi:
            yield shard, lo - offset, hi - offset
        offset += shard.samples


@dataclass(frozen=True)
class Located:
    """Where one sample's JPEG lies: `size` bytes at `offset` of `tar` (offset -1: no .jpg)."""

    tar: Path
    key: str
    offset: int
    size: int

    @property
    def name(self) -> str:
        """`<shard file>/<key>`, how samples are named in keys and messages."""
        return f"{self.tar.name}/{self.key}"


def locate_samples(shards: ShardSet, start: int, stop: int) -> list[Located]:
    """Positions [start, stop) of the split as Located samples, from each tar's index file (or
    its headers when it has none); DamagedShard when a tar is shorter than its index says."""
    out: list[Located] = []
    for shard, first, end in split_segments(shards, start, stop):
        entries = _jpg_entries(shard)
        if len(entries) < end:
            raise DamagedShard(shard.tar, OSError(f"{len(entries)} samples, {end} expected"))
        out += entries[first:end]
    return out


def _jpg_entries(shard: Shard) -> list[Located]:
    try:
        if shard.index is None:
            with tarfile.open(shard.tar, "r:") as tf:
                members = [(key, [(split_name(m.name)[1], m.offset_data, m.size) for m in ms])
                           for key, ms in group_samples(tf)]
        else:
            members = parse_index(shard.index.read_text())
        end = shard.tar.stat().st_size
    except (tarfile.TarError, OSError, ValueError, IndexError) as exc:
        raise DamagedShard(shard.tar, exc) from None
    entries = []
    for key, parts in members:
        offset, size = next(((o, n) for ext, o, n in parts if ext == "jpg"), (-1, 0))
        if offset + size > end:
            raise DamagedShard(shard.tar, OSError("shorter than its index"))
        entries.append(Located(shard.tar, key, offset, size))
    return entries


def read_range(shards: ShardSet, start: int, stop: int) -> Iterator[tuple[str, str, bytes | None]]:
    """(shard file name, key, jpg bytes or None when the sample has no .jpg) for positions
    [start, stop) of the split, in order; raises DamagedShard for a tar that cannot be read
    (evaluate reads val this way)."""
    for shard, first, end in split_segments(shards, start, stop):
        samples = tariterators.tarfile_samples([{"url": str(shard.tar)}])
        try:
            for sample in itertools.islice(samples, first, end):
                yield shard.tar.name, sample["__key__"], sample.get("jpg")
        except (tarfile.TarError, OSError) as exc:
            raise DamagedShard(shard.tar, exc) from None


def find_undecodable(shards: ShardSet, start: int, stop: int) -> str | None:
    """What is wrong with the first bad sample in positions [start, stop) ('<tar>/<key> does
    not decode', '<tar> is damaged (...)'), or None. Names the culprit when DALI fails."""
    try:
        for shard, key, jpg in read_range(shards, start, stop):
            try:
                if jpg is None:
                    raise RuntimeError("no .jpg")
                decode(torch.frombuffer(bytearray(jpg), dtype=torch.uint8))
            except RuntimeError:
                return f"{shard}/{key} does not decode"
    except DamagedShard as exc:
        return str(exc)
    return None
