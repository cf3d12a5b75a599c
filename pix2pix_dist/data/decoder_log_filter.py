"""Keep nvImageCodec's own decode-error lines off stderr in a process that runs DALI.

DALI decodes through nvImageCodec, whose default debug messenger prints each decode failure
itself, e.g. `ESC[0;31m[ERROR] ESC[0m[jpeg_parser] Invalid marker`, before DALI raises; the
DataError that dali_pipeline.py makes of that exception says the same and names the sample.
No setting silences these lines (docs/design.md, "DALI's decoder messages"), so `install()`
sends this process's fd 2 through a small filter process that drops exactly them and forwards
every other byte unchanged and in order. A process, not a thread: what a crashing process
wrote (faulthandler's dump, a C library's last words) is already in the pipe, and the filter
outlives the crash to forward it. It exits when the pipe closes (this process and every child
that inherited fd 2 are gone), so it never outlives them.

This file is also the filter's program: it runs as `python -I -S <this file>`, so it imports
nothing outside the standard library.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import subprocess
import sys
from typing import NamedTuple

# nvImageCodec's DefaultDebugMessenger prints a red "[ERROR] ", a colour reset, then
# "[<codec>] <message>" and a newline, each piece a write of its own (std::cerr is unbuffered),
# so the lines of decoder threads failing together arrive interleaved piece by piece.
RED, TAG, RESET = b"\x1b[0;31m", b"[ERROR] ", b"\x1b[0m"
START = TAG + b"["  # how their line starts once the colour codes are taken out
MAX_LINE = 64 * 1024  # a partial line that long is not one of theirs: forward it
QUIET_S = 0.5  # a burst of their lines is over after this long without input
WAIT_AT_EXIT_S = 2.0  # at exit, how long to let the filter forward what is left


class DecoderLineFilter:
    """Drops nvImageCodec's error lines from a byte stream; everything else passes unchanged.

    A line is theirs when, without colour codes, it starts with `[ERROR] [` and it has a
    colour code (their signature; a plain "[ERROR] [x] ..." line of another program passes). Interleaved
    writers can put two of their tags on one line, and their other newlines then end later
    lines: those `owed` lines are dropped too, until a quiet pause (flush). Only a partial line
    that may still become one of theirs is held back; the rest goes out at once."""

    def __init__(self) -> None:
        self.held = b""  # the start of a line that may be theirs
        self.owed = 0
        self.midline = False  # part of the current line went out: the rest is not theirs

    def feed(self, data: bytes) -> bytes:
        """The bytes to forward now, given the next input."""
        *lines, partial = (self.held + data).split(b"\n")
        out = bytearray()
        for line in lines:
            if self.midline or not self._theirs(line):
                out += line + b"\n"
            self.midline = False
        self.held = partial if not self.midline and self._maybe_theirs(partial) else b""
        if partial and not self.held:
            out += partial
            self.midline = True
        return bytes(out)

    def flush(self) -> bytes:
        """At a quiet pause or the end of input: what is held goes out."""
        out, self.held, self.owed = self.held, b"", 0
        self.midline = self.midline or bool(out)
        return out

    @property
    def pending(self) -> bool:
        return bool(self.held) or self.owed > 0

    def _theirs(self, line: bytes) -> bool:
        text = line.replace(RED, b"").replace(RESET, b"")
        if self.owed or (text.startswith(START) and text != line):
            self.owed = max(0, self.owed + text.count(TAG) - 1)
            return True
        return False

    def _maybe_theirs(self, partial: bytes) -> bool:
        if not partial or len(partial) > MAX_LINE:
            return False
        if self.owed:
            return True
        text = partial.replace(RED, b"").replace(RESET, b"")
        for code in (RED, RESET):  # a colour code cut in two by the read
            text = next((text[:-k] for k in range(len(code) - 1, 0, -1) if text.endswith(code[:k])), text)
        return text.startswith(START) or START.startswith(text)


def run_filter(source: int = 0, sink: int = 1) -> None:
    """The filter process: copy `source` to `sink` through a DecoderLineFilter until end of
    input. Signals that stop a run (Ctrl-C, SIGTERM, a hang-up) are ignored: the filter must
    still forward what the training prints while it saves and stops."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    lines, sink_ok = DecoderLineFilter(), True

    def forward(data: bytes) -> None:
        nonlocal sink_ok
        view = memoryview(data)
        while sink_ok and view:
            try:
                view = view[os.write(sink, view):]
            except OSError:  # the reader is gone: keep draining, so writers never block
                sink_ok = False

    while True:
        if lines.pending and not select.select([source], [], [], QUIET_S)[0]:
            forward(lines.flush())
            continue
        chunk = os.read(source, 65536)
        if not chunk:
            forward(lines.flush())
            return
        forward(lines.feed(chunk))


class _Installed(NamedTuple):
    process: subprocess.Popen
    stderr: int  # a copy of the real stderr, restored at exit
    pipe: tuple[int, int]  # (st_dev, st_ino) of the pipe now at fd 2


_installed: _Installed | None = None


def install() -> None:
    """Route fd 2 of this process, and of the children it starts from now on, through the
    filter. Once per process; again when something has since replaced fd 2 (pytest's capture
    does, per test). Without a stderr, or when the filter cannot start, nothing changes: the
    lines are noise, not a reason to stop."""
    global _installed
    try:
        now = os.fstat(2)
    except OSError:
        return
    if (_installed is not None and _installed.pipe == (now.st_dev, now.st_ino)
            and _installed.process.poll() is None):
        return
    if not sys.executable:
        return
    sys.stderr.flush()
    real = os.dup(2)  # not inherited by children
    read, write = os.pipe()
    try:
        # Its own session: a Ctrl-C at the terminal goes to the training, not to the filter.
        process = subprocess.Popen([sys.executable, "-I", "-S", __file__], stdin=read,
                                   stdout=real, stderr=real, start_new_session=True)
    except OSError:
        for fd in (real, write):
            os.close(fd)
        return
    finally:
        os.close(read)
    os.dup2(write, 2)
    pipe = os.fstat(write)
    os.close(write)
    if _installed is None:
        atexit.register(_restore)
    else:  # its pipe is no longer our fd 2: let it forward the rest before ours goes out
        _finish(_installed)
    _installed = _Installed(process, real, (pipe.st_dev, pipe.st_ino))


def _restore() -> None:
    """At exit: put the real stderr back (what is printed after this goes there directly) and
    give the filter a moment to forward the rest, so a shell prompt comes after our last line."""
    if _installed is None:
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    try:
        now = os.fstat(2)
    except OSError:  # closed meanwhile: nothing left to restore
        return
    if _installed.pipe == (now.st_dev, now.st_ino):
        os.dup2(_installed.stderr, 2)  # our end of the pipe closes: the filter sees its end
    _finish(_installed)


def _finish(installed: _Installed) -> None:
    """Wait (bounded) for a filter whose pipe we no longer write to, and drop its stderr copy."""
    try:
        installed.process.wait(WAIT_AT_EXIT_S)
    except subprocess.TimeoutExpired:
        pass  # a child still holds the pipe: the filter exits when that child does
    os.close(installed.stderr)


if __name__ == "__main__":
    run_filter()
