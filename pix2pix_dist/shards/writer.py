"""Streaming, deterministic, atomic tar shard writer that also produces the DALI index.

Why hand-rolled headers instead of `tarfile.add` or webdataset's `TarWriter`: we need each
member's data offset for the index (known as we write, so no second pass over the tar), a sha256
computed while streaming, and fixed metadata (mtime/uid/gid/names/mode) so identical inputs give
identical bytes.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Any

from ..atomic import fsync_dir
from ..shard_format import component, index_name, render_index

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar and Python's tarfile pad archives to 10 KiB records


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)  # its defaults: mtime 0, mode 0o644, uid/gid 0, no owner names, a file
    ti.size = size
    # ustar only: keys are short ASCII, so no PAX/GNU extension headers that would shift offsets.
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def sample_nbytes(files: list[tuple[str, bytes]]) -> int:
    """Bytes a sample adds to a tar (headers + padded data)."""
    return sum(BLOCK + -(-len(d) // BLOCK) * BLOCK for _, d in files)


class TarShard:
    """One tar being written to `<name>.tmp`; `finish()` publishes tar + index atomically."""

    def __init__(self, tar_path: Path):
        self.tar_path = tar_path
        self.idx_path = tar_path.with_name(index_name(tar_path.name))
        self.tmp = tar_path.with_name(tar_path.name + ".tmp")
        self.idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._f = open(self.tmp, "xb")  # never over a file of someone else's (build.py refuses those)
        self._sha = hashlib.sha256()
        self.offset = 0
        self.samples = 0
        self._index: list[list[str]] = []
        self._made_index = False

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._sha.update(b)
        self.offset += len(b)

    def add(self, key: str, files: list[tuple[str, bytes]]) -> None:
        """Append one sample: `files` are (extension, bytes) pairs, written in this order."""
        comps = []
        for ext, data in files:
            name = f"{key}.{ext}"
            self._write(_header(name, len(data)))
            comps.append(component(ext, self.offset, len(data), name))
            self._write(data)
            self._write(b"\0" * (-len(data) % BLOCK))  # pad to a whole block (nothing when aligned)
        self._index.append(comps)
        self.samples += 1

    def finish(self) -> dict[str, Any]:
        """Close the archive and write the index, both still as `.tmp` and fsynced; return the
        shard's record. The caller records it durably, then calls `publish()`: a shard under its
        final name is therefore always known (with its sha256) to the progress file."""
        end = self.offset + 2 * BLOCK
        self._write(b"\0" * (2 * BLOCK + (-end) % RECORD))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        index = render_index(self._index)
        with open(self.idx_tmp, "xb") as f:
            self._made_index = True
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        return {
            "tar": self.tar_path.name,
            "index": self.idx_path.name,
            "samples": self.samples,
            "bytes": self.offset,
            "sha256": self._sha.hexdigest(),
            "index_sha256": hashlib.sha256(index).hexdigest(),
        }

    def publish(self) -> None:
        """Rename index then tar into place (a final-named tar always has its index beside it)."""
        os.replace(self.idx_tmp, self.idx_path)
        os.replace(self.tmp, self.tar_path)
        fsync_dir(self.tar_path.parent)

    def abort(self) -> None:
        """Drop the unfinished or unpublished tar (on error or Ctrl-C)."""
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)
            if self._made_index:  # only files this shard created
                self.idx_tmp.unlink(missing_ok=True)
