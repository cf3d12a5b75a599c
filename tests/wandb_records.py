"""Read offline wandb run files (`run-<id>.wandb`) back, for tests.

wandb >= 0.30 ships no reader, so this follows the on-disk format directly. It is LevelDB-log
framing: a 7-byte file header (`:W&B`, magic 0xBEE1 little-endian, version 0), then the file is
cut into 32 KiB blocks; each block holds chunks with a 7-byte header (crc32 LE, length u16 LE,
type u8) and a record that does not fit in the rest of a block is split into FIRST, MIDDLE...,
LAST chunks. A block tail shorter than a chunk header is zero padding. The checksum is
zlib.crc32 over the type byte followed by the chunk data. Each reassembled record is a
serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a `.wandb` file, in order; raises ValueError on a corrupt file."""
    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a wandb run file (header {data[:7]!r})")
    records = []
    pending: bytearray | None = None  # payload of a record split over chunks
    pos = len(HEADER)
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block  # zero padding at the end of a block
            continue
        if pos + CHUNK_HEADER.size > len(data):
            raise ValueError(f"{path}: truncated chunk header at byte {pos}")
        chunk_pos = pos
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        pos += CHUNK_HEADER.size
        chunk = data[pos:pos + length]
        pos += length
        if len(chunk) != length or length > left_in_block - CHUNK_HEADER.size:
            raise ValueError(f"{path}: chunk at byte {chunk_pos} overruns its block or the file")
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: checksum mismatch in chunk at byte {chunk_pos}")

        if kind == FULL and pending is None:
            records.append(_parse(chunk))
        elif kind == FIRST and pending is None:
            pending = bytearray(chunk)
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += chunk
            if kind == LAST:
                records.append(_parse(bytes(pending)))
                pending = None
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {chunk_pos}")
    if pending is not None:
        raise ValueError(f"{path}: file ends inside a record")
    return records


def _parse(payload: bytes) -> wandb_internal_pb2.Record:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    return record


def history_rows(path: str | Path) -> list[dict[str, Any]]:
    """One dict per history record: key (nested keys joined with '/') -> decoded JSON value.

    Includes wandb's own keys such as `_step`, `_runtime` and `_timestamp`.
    """
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def find_run_file(run_dir: str | Path) -> Path:
    """The newest offline run file, `<run_dir>/wandb/offline-run-*/run-*.wandb`."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"),
                   key=lambda p: (p.stat().st_mtime_ns, p.name))
    if not files:
        raise FileNotFoundError(f"no offline wandb run file under {run_dir}/wandb")
    return files[-1]
