"""Folder locks: a second holder is refused with the first one named; death releases the lock."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pix2pix_dist.locking import FolderLock, LockError

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
