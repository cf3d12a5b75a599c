"""Exclusive folder locks: one shard writer per output folder, one training per run folder.

A lock is `fcntl.flock` on a file inside the folder. The kernel releases it when the holder
exits, however it exits (SIGKILL, OOM kill, power loss of a node that holds a local lock), so a
stale lock never needs cleaning by hand. The file also records who holds it, so the second
process can say whom it is waiting for. flock is advisory and per open file: it protects
against our own tools, not against other programs writing into the folder.

On network file systems, flock is only as good as the file system's lock support (NFSv4 and
Lustre with `flock` mount option support it; some FUSE file systems do not).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """The folder is held by another process; the message names the holder, on one line."""


class FolderLock:
    """`with FolderLock(folder, "shard writer"):` holds the folder's lock for the block.

    Raises LockError at once (never waits) when another process holds it."""

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockError(f"{self.path.parent} is in use by another {holder or self.what} "
                            f"(lock {self.path}); wait for it to finish or stop it") from None
        except OSError:
            os.close(fd)
            raise
        # Record the holder for the message above; the lock itself is the flock, not the text.
        info = {"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """'shard writer (pid 123 on host, since ..., command ...)' from the lock file, if readable."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"{info['what']} (pid {info['pid']} on {info['host']} since {info['since']}: "
                f"{info['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
