"""Opening a file by name without blocking: regular files only.

`open()` on a FIFO waits for a writer, forever; a socket or a device is never data of ours. So
every file the tools open by name (manifests, progress records, configs, shards, indexes,
checkpoints, images, locks) goes through `open_fd`/`open_regular`: the file is opened with
O_NONBLOCK (open() of a FIFO then returns at once) and fstat'ed before one byte is read.
Standard library only: the shard format and the writer's workers import it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import IO, Any


class NotRegularFile(OSError):
    """A FIFO, socket or device where a file was expected; never read."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))


def open_fd(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """os.open(path, flags) of a regular file; NotRegularFile (an OSError) for anything else."""
    fd = os.open(path, flags | os.O_NONBLOCK, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str | os.PathLike, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """`open(path, mode)` for reading ("rb" or "r"), of a regular file only."""
    return open(open_fd(path), mode, **kwargs)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_regular(path) as f:
        return f.read()


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    with open_regular(path, "r", encoding=encoding) as f:
        return f.read()

