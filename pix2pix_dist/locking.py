"""Exclusive folder locks: one shard writer per output folder, one training per run folder.

A lock is `fcntl.flock` on a file inside the folder. The kernel releases it when the holder
exits, however it exits (SIGKILL, OOM kill, power loss of a node that holds a local lock), so a
stale lock never needs cleaning by hand. A flock belongs to the open file, which forked children
share: the holder's children (DataLoader workers, shard-writer workers) close their copy at
once, so the lock dies with the holder, not with its last child (docs/design.md, "Failures,
signals and locks", says why not POSIX record locks). The file also records who holds it, so
the second process can say whom it is waiting for; a `.lock` that is not such a record (a user's
file) is never overwritten. flock is advisory and per open file: it protects against our own
tools, not against other programs writing into the folder.

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
import weakref
from pathlib import Path

from .errors import UserError
from .files import open_fd

LOCK_NAME = ".lock"


class LockError(UserError):
    """The folder is held by another process; the message names the holder, on one line."""


_HELD: "weakref.WeakSet[FolderLock]" = weakref.WeakSet()
"""Locks this process holds: a forked child closes their descriptors (_forget_in_child)."""


def _forget_in_child() -> None:
    for lock in list(_HELD):
        lock._close()


os.register_at_fork(after_in_child=_forget_in_child)


class FolderLock:
    """`with FolderLock(folder, "shard writer"):` holds the folder's lock for the block.

    Raises LockError at once (never waits) when another process holds it."""

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_fd(self.path, os.O_RDWR | os.O_CREAT)  # a FIFO named .lock is refused
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_holder(fd)
            os.close(fd)
            holder = (f"{info['what']} (pid {info['pid']} on {info['host']} since {info['since']}: "
                      f"{info['command']})" if info else self.what)
            raise LockError(f"{self.path.parent} is in use by another {holder} "
                            f"(lock {self.path}); wait for it to finish or stop it") from None
        except OSError:
            os.close(fd)
            raise
        if os.fstat(fd).st_size and _read_holder(fd) is None:  # not a lock record of ours
            os.close(fd)
            raise LockError(f"{self.path} exists and is not a lock file of pix2pix_dist (a file of "
                            f"yours?); move it away or choose another folder")
        # Record the holder for the message above; the lock itself is the flock, not the text.
        info = {"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        _HELD.add(self)
        return self

    def release(self) -> None:
        self._close()  # closing the last descriptor of the open file releases the flock
        _HELD.discard(self)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    """The holder record in the lock file, None when it holds no such record."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and {"what", "pid", "host", "since", "command"} <= info.keys() else None
