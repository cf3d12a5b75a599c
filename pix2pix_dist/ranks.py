"""How training processes fail together: one line per error, no orphans, no rank left waiting.

Design notes: docs/design.md, "Failures, signals and locks".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

import torch

from .atomic import atomic_write
from .lifetime import set_parent_death_signal

PARENT_DIED = signal.SIGHUP
"""The parent-death signal: SIGHUP's default action ends the process, and "the controlling
process went away" is what it means."""


class RankError(RuntimeError):
    """An error every rank raises together (they agreed on it): reported once, by rank 0.

    Subclasses are the one-line errors main() turns into exit code 2."""

    def __init__(self, message: str, *, all_ranks: bool = False) -> None:
        super().__init__(message)
        self.all_ranks = all_ranks


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the world size, from the launcher's environment (which
    is there before, and after, the process group). ValueError (one line) when they make no
    sense: a launcher never sets such values, a user may (`WORLD_SIZE=0 train.py --dry-run`)."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if not (rank.isdigit() and world.isdigit() and int(rank) < int(world)):
        raise ValueError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be whole numbers with "
                         f"0 <= RANK < WORLD_SIZE")
    return int(rank), int(world)


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


def agree(error: str | None, error_type: type[RankError]) -> None:
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


def report_error(message: str, *, job_wide: bool = False) -> None:
    """Print `error: [rank R] message` as one line (plain `error: message` in a single process,
    or for an error every rank agreed on, printed by rank 0 alone), and give the same line to
    torch's elastic agent, whose failure summary otherwise says only "To enable traceback see
    ..." (TORCHELASTIC_ERROR_FILE is its documented channel)."""
    rank, world = rank_and_world()
    line = f"error: [rank {rank}] {message}" if world > 1 and not job_wide else f"error: {message}"
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):  # the line above is already on the terminal
            atomic_write(error_file, json.dumps({"message": line, "timestamp": int(time.time())}))
