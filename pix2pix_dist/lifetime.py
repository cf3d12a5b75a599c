"""A child process that ends with its parent: training ranks under a launcher, shard-writer
workers. Standard library only, so a worker process imports nothing heavy for it."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def set_parent_death_signal(sig: int, parent: int) -> None:
    """Have the kernel send `sig` to this process when its parent (pid `parent`, read before
    this call) exits: prctl(PR_SET_PDEATHSIG), Linux only; nothing where it is not available.
    A parent that died before the request took effect gets the signal sent at once."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
