"""Atomic file writes (readers see the old file or the new one, never half of either) and the
file checksum that the shard writer and the checkpoints both record."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from .files import open_regular


def fsync_dir(path: Path) -> None:
    """Make a rename durable (the directory entry itself must reach the disk); best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via `<name>.tmp` + fsync + rename (text is written as UTF-8). An OSError names
    `path` (a failed write, e.g. a full disk, names no file by itself)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # includes Ctrl-C: leave no half-written .tmp behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        raise
    fsync_dir(path.parent)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (shards and checkpoints are large)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
