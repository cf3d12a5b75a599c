"""How training processes fail together: one line per error, no orphans, no rank left waiting.

Design notes: docs/design.md, "Failures, signals and locks".
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import torch

from .errors import UserError, rank_and_world, report_error
from .imageio import first_line
from .lifetime import PARENT_AT_START, set_parent_death_signal

PARENT_DIED = signal.SIGHUP
"""The parent-death signal: SIGHUP's default action ends the process, and "the controlling
process went away" is what it means."""
RENDEZVOUS_TIMEOUT_S = 60
"""How long a rank waits to reach its launcher's rendezvous store (reach_rendezvous)."""


def die_with_parent() -> None:
    """Under torch's elastic agent (`accelerate launch`, torchrun), ask the kernel to send
    PARENT_DIED to this rank when the agent, its parent, exits (Linux).

    If the launcher is SIGKILLed, nothing else would stop the ranks. The training loop treats
    the signal like SIGTERM (save a checkpoint, stop at the next step boundary); before the
    loop it ends the process. The kernel sends it once per exiting thread of the parent's
    process, hence a signal of its own rather than SIGTERM, whose second arrival would have to
    mean "stop now". Ranks run in their own session (the agent starts them so), so no terminal
    hang-up can reach them: an ignored SIGHUP (`nohup accelerate launch ...`) is restored.

    The parent is the one this process had at start-up (lifetime.PARENT_AT_START), not the
    current one: a launcher killed while this rank imported torch has already been replaced by
    init (or a subreaper), and the rank must stop now, not train or wait on its own."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # a plain process: its parent is a shell
        return
    if os.getppid() != PARENT_AT_START:
        report_error(f"the launcher (pid {PARENT_AT_START}) exited while this process started; "
                     f"stopping")
    if signal.getsignal(PARENT_DIED) is signal.SIG_IGN:
        signal.signal(PARENT_DIED, signal.SIG_DFL)
    set_parent_death_signal(PARENT_DIED, PARENT_AT_START)  # ends this process if it is gone


def reach_rendezvous() -> None:
    """Under a launcher that hosts the rendezvous store itself (torch's elastic agent, which
    `accelerate launch` and torchrun run: TORCHELASTIC_USE_AGENT_STORE), check within
    RENDEZVOUS_TIMEOUT_S that its store accepts a connection, or raise UserError: the store is
    up before any rank starts, so one that never answers means the launcher is gone, and torch's
    own connect would retry for its 30-minute process-group timeout, printing C++ stack traces.
    A plain TCP connection (closed at once; the store ignores it) keeps this one line. Without an
    agent store, rank 0 starts the store after its own imports: the wait is left to torch."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or rank_and_world()[1] == 1:
        return
    host, port = os.environ.get("MASTER_ADDR", "localhost"), os.environ.get("MASTER_PORT", "")
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline or isinstance(exc, ValueError):
                raise UserError(f"cannot reach the launcher's rendezvous store at {host}:{port} "
                                f"within {RENDEZVOUS_TIMEOUT_S} s (did the launcher exit?): "
                                f"{first_line(exc)}") from None
            time.sleep(1)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def agree(error: str | None, error_type: type[UserError]) -> None:
    """Collective: raise `error_type` on every rank when any rank has an error (the lowest
    rank's message), so no rank goes on to wait for the others in a later collective."""
    first = next((e for e in all_gather(error) if e is not None), None)
    if first is not None:
        raise error_type(first, all_ranks=True)


def peer_failed(exc: BaseException) -> bool:
    """A collective failed because another process died (gloo reports a closed connection)."""
    return isinstance(exc, getattr(torch.distributed, "DistNetworkError", ())) or (
        isinstance(exc, RuntimeError)
        and any(s in str(exc) for s in ("Connection closed by peer", "Connection reset by peer")))
