"""Folder locks: a second holder is refused with the first one named; death releases the lock,
whatever children the holder leaves; a `.lock` that is not ours is never overwritten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pix2pix_dist.locking import LOCK_NAME, FolderLock, LockError

HOLD = """
import sys, time
from pix2pix_dist.locking import FolderLock
with FolderLock(sys.argv[1], "training"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_second_process_is_refused_and_death_releases(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the lock is taken: no race
        with pytest.raises(LockError) as info:
            FolderLock(tmp_path, "training").acquire()
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "training" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(tmp_path, "training"):  # the kernel released it with the process
        pass


def test_a_second_open_in_one_process_is_refused_until_release(tmp_path):
    lock = FolderLock(tmp_path / "new", "shard writer").acquire()
    with pytest.raises(LockError):
        FolderLock(tmp_path / "new", "shard writer").acquire()  # a second open file is refused too
    lock.release()
    FolderLock(tmp_path / "new", "shard writer").acquire().release()


HOLD_WITH_CHILD = """
import multiprocessing, sys, time
from pix2pix_dist.locking import FolderLock
lock = FolderLock(sys.argv[1], "training").acquire()
# A forked child, as torch's DataLoader workers are: it shares the open file of the lock.
fork = multiprocessing.get_context("fork")
started = fork.Event()  # set by the child's target, i.e. after its fork hooks ran
child = fork.Process(target=lambda: (started.set(), time.sleep(600)))
child.start()
started.wait()
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_lock_dies_with_its_holder_not_with_its_forked_children(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WITH_CHILD, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()  # kill -9 of the training: its loader workers live on for a while
        holder.wait()
        os.kill(child, 0)  # still running, and it holds a copy of every descriptor
        with FolderLock(tmp_path, "training"):  # yet the lock is free at once
            pass
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("content", [b"my notes\n", b'{"pid": 12}\n'])
def test_a_lock_file_that_is_not_ours_is_refused_and_kept(tmp_path, content):
    (tmp_path / LOCK_NAME).write_bytes(content)
    with pytest.raises(LockError, match="is not a lock file of pix2pix_dist"):
        FolderLock(tmp_path, "shard writer").acquire()
    assert (tmp_path / LOCK_NAME).read_bytes() == content
    FolderLock(tmp_path / "other", "training").acquire().release()  # ours: written, reused
    FolderLock(tmp_path / "other", "training").acquire().release()


def test_a_fifo_named_like_the_lock_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / LOCK_NAME)
    with pytest.raises(OSError, match="not a regular file"):
        FolderLock(tmp_path, "training").acquire()
