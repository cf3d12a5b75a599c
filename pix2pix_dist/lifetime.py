"""How a process ends: a child with its parent (training ranks under a launcher, shard-writer
workers), a finished command at once on Ctrl-C. Standard library only, so a worker process
imports nothing heavy for it.

Imported by the package's __init__, so PARENT_AT_START is read within milliseconds of the
process's start: a rank that installs its parent-death signal seconds later (after importing
torch) can still tell that the launcher died in between (docs/design.md, "Failures, signals
and locks")."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

PARENT_AT_START = os.getppid()
"""This process's parent when the package was first imported (before torch or any other slow
import): the launcher that started it, unless it died in the first milliseconds."""


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


def end_at_once_on_ctrl_c() -> None:
    """Once a command's work is over (saved, or interrupted), make Ctrl-C end the process at
    once (SIG_DFL). Interpreter teardown runs atexit hooks (DALI's join its pipeline threads,
    a second or more); a Ctrl-C there would raise KeyboardInterrupt inside a hook, which Python
    prints as an ignored exception with a traceback. Nothing is left to save by then."""
    for stream in (sys.stdout, sys.stderr):  # the default action leaves no time to flush
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
