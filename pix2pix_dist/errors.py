"""Errors a user caused, and the one way every command reports them (`run_main`: one line, exit
code 2) and warns (`warn`). Design notes: docs/design.md, "Failures, signals and locks". No torch
import: the shard writer's command stays light."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Callable

from .atomic import atomic_write
from .files import NotRegularFile


class UserError(Exception):
    """A problem the user can fix (an option, the data, a busy folder): one line, exit code 2.

    `all_ranks`: every process raised it together (they agreed on it, or read the same command
    line), so it is reported once, by rank 0."""

    all_ranks = False

    def __init__(self, message: str, *, all_ranks: bool | None = None) -> None:
        super().__init__(message)
        if all_ranks is not None:
            self.all_ranks = all_ranks


class DataError(UserError):
    """A data problem (missing shards, too few samples, corrupt JPEG)."""


class ShardError(UserError):
    """A problem of the shard writer's input or output (missing source, unwritable output...)."""


class BenchError(UserError):
    """Bad input for the benchmark."""


# Files and folders can fail in these ways whatever the code does (a full disk, a read-only,
# foreign or missing folder, a FIFO where a file belongs): one line, exit 2. Other OSErrors are
# bugs and keep their traceback.
USER_FIXABLE_OS_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                    errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                                    errno.EEXIST, errno.ENAMETOOLONG})


def warn(message: str) -> None:
    """The one way to warn: `warning: message` on stderr, at once."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the world size, from the launcher's environment (which
    is there before, and after, the process group). UserError when they make no sense: a
    launcher never sets such values, a user may (`WORLD_SIZE=0 train.py --dry-run`)."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if not (rank.isdigit() and world.isdigit() and int(rank) < int(world)):
        raise UserError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be whole numbers with "
                        f"0 <= RANK < WORLD_SIZE")
    return int(rank), int(world)


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


def run_main(body: Callable[[], int | None], *, interrupted: str = "interrupted") -> int:
    """Run a command's `body` and return its exit code: 0 (or what it returns) on success, 2 for
    a UserError or a user-fixable OSError, 130 on Ctrl-C (printing `interrupted`), 1 on a rank
    that stopped because another process of the launch failed (its own line says why)."""
    try:
        rank, world = rank_and_world()
    except UserError as exc:  # report_error needs them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return body() or 0
    except UserError as exc:
        if not exc.all_ranks or rank == 0:
            report_error(str(exc), job_wide=exc.all_ranks)
        return 2
    except OSError as exc:
        if exc.errno not in USER_FIXABLE_OS_ERRORS and not isinstance(exc, NotRegularFile):
            raise
        report_error(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from .ranks import peer_failed

        if world == 1 or not peer_failed(exc):
            raise
        # Another rank died: its own error line says why. No error file for the launcher
        # here, so its failure summary keeps pointing at that rank's line.
        print(f"[rank {rank}] stopped: another training process failed or was killed",
              file=sys.stderr, flush=True)
        return 1
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

