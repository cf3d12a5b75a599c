"""Parallel decode/convert with ordered, bounded results.

Results come back in submission order (so the shards do not depend on the number of workers or
on scheduling), and only a fixed window of tasks is in flight (so memory stays bounded even when
the tar writer is slower than the decoders; `Pool.imap` would queue the whole dataset).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import NamedTuple

from .images import Converted, ImageSettings, convert_image
from .sources import Reader


class Task(NamedTuple):
    stream: int
    pos: int
    relpath: str
    key: str


class Result(NamedTuple):
    stream: int
    pos: int
    relpath: str
    key: str
    files: list[tuple[str, bytes]] | None
    """[('jpg', bytes), ('json', bytes)] for an accepted image, None when skipped."""
    reason: str | None
    detail: str | None


_readers: list[Reader] = []
_settings = ImageSettings()


def worker_signals() -> None:
    """Pool initializer part: Ctrl-C reaches the whole process group, and the main process
    handles it once, cleanly, instead of every worker printing a KeyboardInterrupt traceback.
    SIGTERM (sent by Pool.terminate) must simply end a worker, whatever the CLI installed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _init_worker(sources: list[tuple[str, str]], settings: ImageSettings, ignore_sigint: bool) -> None:
    global _readers, _settings
    if ignore_sigint:
        worker_signals()
    _readers = [Reader(kind, Path(path)) for kind, path in sources]
    _settings = settings


def process(task: Task) -> Result:
    """Read, validate and convert one candidate; every failure becomes a skip reason."""
    try:
        data = _readers[task.stream].read(task.relpath)
    except zipfile.BadZipFile as e:  # e.g. CRC mismatch of a damaged member
        return Result(*task, None, "corrupt", str(e))
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        return Result(*task, None, "unreadable", f"{type(e).__name__}: {e}")
    try:
        out = convert_image(data, _settings)
    except Exception as e:  # a PIL plugin bug on a hostile file must not end a 118k-image run
        return Result(*task, None, "corrupt", f"{type(e).__name__}: {e}")
    if not isinstance(out, Converted):
        return Result(*task, None, out.reason, out.detail)
    meta = {"key": task.key, "source": task.relpath, **out.meta}
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return Result(*task, [("jpg", out.jpeg), ("json", meta_bytes)], None, None)


def _process_batch(tasks: list[Task]) -> list[Result]:
    return [process(t) for t in tasks]


class Executor:
    """`workers` processes (or the calling process when workers == 1)."""

    def __init__(self, sources: list[tuple[str, str]], settings: ImageSettings, workers: int,
                 batch: int = 8, window_per_worker: int = 4):
        self.workers = workers
        self.batch = batch
        self.window = max(2, workers * window_per_worker)
        self.pool = None
        if workers > 1:
            self.pool = mp.get_context().Pool(workers, _init_worker, (sources, settings, True))
        else:
            _init_worker(sources, settings, False)

    def map(self, tasks: Iterable[Task]) -> Iterator[Result]:
        """Results in task order. Stop iterating early at will: leftovers are discarded."""
        if self.pool is None:
            for t in tasks:
                yield process(t)
            return
        it = iter(tasks)
        pending: deque = deque()

        def submit() -> None:
            chunk = list(islice(it, self.batch))
            if chunk:
                pending.append(self.pool.apply_async(_process_batch, (chunk,)))

        for _ in range(self.window):
            submit()
        while pending:
            results = pending.popleft().get()
            submit()
            yield from results

    def close(self, terminate: bool = False) -> None:
        if self.pool is not None:
            if terminate:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None
