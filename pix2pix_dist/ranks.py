"""How training processes fail together: one line per error, no orphans, no rank left waiting.

Design notes: docs/design.md, "Failures, signals and locks".
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

from .errors import UserError
from .lifetime import set_parent_death_signal

PARENT_DIED = signal.SIGHUP
"""The parent-death signal: SIGHUP's default action ends the process, and "the controlling
process went away" is what it means."""


def die_with_parent() -> None:
    """Under torch's elastic agent (`accelerate launch`, torchrun), ask the kernel to send
    PARENT_DIED to this rank when the agent, its parent, exits (Linux).

    If the launcher is SIGKILLed, nothing else would stop the ranks. The training loop treats
    the signal like SIGTERM (save a checkpoint, stop at the next step boundary); before the
    loop it ends the process. The kernel sends it once per exiting thread of the parent's
    process, hence a signal of its own rather than SIGTERM, whose second arrival would have to
    mean "stop now". Ranks run in their own session (the agent starts them so), so no terminal
    hang-up can reach them: an ignored SIGHUP (`nohup accelerate launch ...`) is restored."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # a plain process: its parent is a shell
        return
    if signal.getsignal(PARENT_DIED) is signal.SIG_IGN:
        signal.signal(PARENT_DIED, signal.SIG_DFL)
    set_parent_death_signal(PARENT_DIED, os.getppid())


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
