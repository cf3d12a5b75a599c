"""Reading a split's samples in order, straight from its tars (webdataset's tar iterator):
positions [start, stop) of the concatenated split, and the first sample that does not decode.

Used by the torch backend's workers, by evaluation (val read in order) and by the DALI backend
to name the culprit after a DALI error.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from webdataset import tariterators

from .errors import DataError
from .geometry import decode
from .shards_index import ShardSet


@dataclass(frozen=True)
class Segment:
    tar: Path
    start: int
    stop: int
    """Sample numbers [start, stop) inside the tar."""


class DamagedShard(DataError):
    """A tar that cannot be read to its end (truncated, overwritten): no sample can be trusted."""

    def __init__(self, tar: Path, exc: BaseException) -> None:
        # webdataset appends the open file and the url to the exception's args: keep the reason.
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        super().__init__(f"{tar.name} is damaged ({reason})")


def read_segments(segments: list[Segment]) -> Iterator[tuple[str, str, bytes | None]]:
    """(shard file name, key, jpg bytes or None when the sample has no .jpg) per sample.
    Raises DamagedShard for a tar that cannot be read."""
    for seg in segments:
        samples = tariterators.tarfile_samples([{"url": str(seg.tar)}])
        try:
            for i, sample in enumerate(samples):
                if i >= seg.stop:
                    break
                if i >= seg.start:
                    yield seg.tar.name, sample["__key__"], sample.get("jpg")
        except (tarfile.TarError, OSError) as exc:
            raise DamagedShard(seg.tar, exc) from None


def split_segments(shards: ShardSet, start: int, stop: int) -> list[Segment]:
    """Split positions [start, stop) of the concatenated split into per-tar pieces."""
    out, offset = [], 0
    for shard in shards.shards:
        lo, hi = max(start, offset), min(stop, offset + shard.samples)
        if lo < hi:
            out.append(Segment(shard.tar, lo - offset, hi - offset))
        offset += shard.samples
    return out


def read_range(shards: ShardSet, start: int, stop: int) -> Iterator[tuple[str, str, bytes | None]]:
    """(shard file name, key, jpg bytes or None) for positions [start, stop) of the split, in
    order; raises DamagedShard for a tar that cannot be read (evaluate reads val this way)."""
    return read_segments(split_segments(shards, start, stop))




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
