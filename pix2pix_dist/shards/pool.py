"""Parallel decode/convert with ordered, bounded results.

Results come back in submission order (so the shards do not depend on the number of workers or
on scheduling), and only a fixed window of tasks is in flight (so memory stays bounded even when
the tar writer is slower than the decoders; `Executor.map` of concurrent.futures would submit
the whole dataset up front).

`concurrent.futures.ProcessPoolExecutor`, not `multiprocessing.Pool`: when a worker dies (OOM
killer, a decoder segfault) the former fails every pending future with BrokenProcessPool, while
the latter silently replaces the worker and leaves `.get()` waiting forever for its lost task.
"""

from __future__ import annotations

import json
import signal
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .errors import ShardError
from .images import Converted, ImageSettings, convert_image
from .sources import Reader


class Task(NamedTuple):
    stream: int
    pos: int
    relpath: str
    key: str
    size: int
    """Size as listed (file size / zip member size): too large ones are skipped unread."""


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
    """Worker initializer part: Ctrl-C reaches the whole process group, and the main process
    handles it once, cleanly, instead of every worker printing a KeyboardInterrupt traceback.
    SIGTERM (sent by `close(terminate=True)`) must simply end a worker, whatever the CLI installed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker_died(what: str) -> ShardError:
    return ShardError(f"a worker process died (out of memory?) while processing {what}; complete "
                      f"shards are kept, run the same command again to resume")


def start_pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs)


def stop_pool(pool: ProcessPoolExecutor, terminate: bool) -> None:
    """Shut down; with `terminate`, end the workers now instead of letting them finish the tasks
    already queued (Ctrl-C or an error: their results would be thrown away anyway)."""
    # No public API for this before Python 3.14 (`terminate_workers`): the process table it is.
    procs = list((getattr(pool, "_processes", None) or {}).values()) if terminate else []
    pool.shutdown(wait=not terminate, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join()


def _init_worker(sources: list[tuple[str, str]], settings: ImageSettings, ignore_sigint: bool) -> None:
    global _readers, _settings
    if ignore_sigint:
        worker_signals()
    _readers = [Reader(kind, Path(path)) for kind, path in sources]
    _settings = settings


def process(task: Task) -> Result:
    """Read, validate and convert one candidate; every failure becomes a skip reason."""
    limit = _settings.max_bytes
    if task.size > limit:  # checked before reading: a zip bomb or a huge file is never inflated
        return Result(*task[:4], None, "too_large", f"{task.size} bytes > --max-bytes {limit}")
    try:
        data = _readers[task.stream].read(task.relpath, limit)
    except zipfile.BadZipFile as e:  # e.g. CRC mismatch of a damaged member
        return Result(*task[:4], None, "corrupt", str(e))
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        return Result(*task[:4], None, "unreadable", f"{type(e).__name__}: {e}")
    if len(data) > limit:  # the file grew since it was listed
        return Result(*task[:4], None, "too_large", f"more than --max-bytes {limit}")
    try:
        out = convert_image(data, _settings)
    except Exception as e:  # a PIL plugin bug on a hostile file must not end a 118k-image run
        return Result(*task[:4], None, "corrupt", f"{type(e).__name__}: {e}")
    if not isinstance(out, Converted):
        return Result(*task[:4], None, out.reason, out.detail)
    meta = {"key": task.key, "source": task.relpath, **out.meta}
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return Result(*task[:4], [("jpg", out.jpeg), ("json", meta_bytes)], None, None)


def _process_batch(tasks: list[Task]) -> list[Result]:
    return [process(t) for t in tasks]


class Executor:
    """`workers` processes (or the calling process when workers == 1)."""

    def __init__(self, sources: list[tuple[str, str]], settings: ImageSettings, workers: int,
                 batch: int = 8, window_per_worker: int = 4):
        self.sources = sources
        self.batch = batch
        self.window = max(2, workers * window_per_worker)
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self.pool = start_pool(workers, _init_worker, (sources, settings, True))
        else:
            _init_worker(sources, settings, False)

    def map(self, tasks: Iterable[Task]) -> Iterator[Result]:
        """Results in task order. Stop iterating early at will: leftovers are discarded."""
        if self.pool is None:
            for t in tasks:
                yield process(t)
            return
        it = iter(tasks)
        pending: deque[tuple[list[Task], Future[Any]]] = deque()

        def submit() -> None:
            chunk = list(islice(it, self.batch))
            if chunk:
                try:
                    pending.append((chunk, self.pool.submit(_process_batch, chunk)))  # type: ignore[union-attr]
                except BrokenProcessPool:
                    raise worker_died(self._where(chunk)) from None

        for _ in range(self.window):
            submit()
        while pending:
            chunk, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:
                # The pool cannot tell which task killed it; this batch is the oldest unfinished one.
                raise worker_died(self._where(chunk)) from None
            submit()
            yield from results

    def _where(self, chunk: list[Task]) -> str:
        first = chunk[0]
        where = f"{self.sources[first.stream][1]}/{first.relpath}"
        return where if len(chunk) == 1 else f"{where} (or one of the next {len(chunk) - 1} images)"

    def close(self, terminate: bool = False) -> None:
        if self.pool is not None:
            stop_pool(self.pool, terminate)
            self.pool = None
