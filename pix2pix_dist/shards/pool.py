"""Worker processes with ordered, bounded results, that cannot hang and cannot outlive us.

Results come back in submission order (so the shards do not depend on the number of workers or
on scheduling), and only a fixed window of jobs is in flight (so memory stays bounded even when
the tar writer is slower than the decoders).

Why our own small pool instead of `concurrent.futures.ProcessPoolExecutor` (see docs/design.md,
"Shard writer processes"): the executor reads results in a manager thread from one pipe that
all workers share. A worker ended while writing a multi-MB result (`terminate()` on the way
out, the OOM killer) leaves half a message in that pipe, the thread waits in `recv()` forever
for the rest, and interpreter exit joins the thread: `make shards` hung after it had finished.
Here each worker has its own pipes, the calling thread reads them itself, and the parent holds
no write end of a result pipe: a worker that dies mid-message gives EOF at once, never a wait.
Workers die with the parent (PR_SET_PDEATHSIG, plus a parent-pid check as a fallback), so a
SIGKILLed writer leaves no orphans.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import ShardError
from ..files import NotRegularFile
from ..imageio import NOT_A_FILE, display_name
from ..lifetime import set_parent_death_signal
from .images import Converted, ImageSettings, convert_image
from .sources import NOT_REGULAR, Reader

PARENT_CHECK_S = 1.0  # how often an idle worker checks that its parent still exists


class WorkerDied(Exception):
    """A worker process ended while the pool was in use; `job` is what it was working on (None
    when it held no job)."""

    def __init__(self, job: Any) -> None:
        super().__init__(job)
        self.job = job


def _worker_main(handler: Callable[[Any], Any], jobs: Connection, results: Connection, parent: int) -> None:
    # Killed by the kernel when the parent dies (Linux); elsewhere the idle-time check below.
    set_parent_death_signal(signal.SIGKILL, parent)
    # Ctrl-C reaches the whole process group: the parent handles it once, cleanly, instead of
    # every worker printing a KeyboardInterrupt traceback. SIGTERM simply ends a worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        while not jobs.poll(PARENT_CHECK_S):
            if os.getppid() != parent:
                os._exit(1)
        job = jobs.recv()
        if job is None:
            return
        try:
            out: tuple[bool, Any] = (True, handler(job))
        except Exception as e:  # handed to the parent, which raises it
            out = (False, e)
        results.send(out)


@dataclass
class _Worker:
    process: Any
    jobs: Connection
    results: Connection
    pending: deque  # (sequence number, job) sent to this worker, oldest first


def _drop_pending(w: _Worker) -> None:
    """Read and drop the results of the jobs `w` was sent that no map consumed (EOFError or
    OSError when it died, possibly half-way through a message)."""
    while w.pending:
        w.results.recv()
        w.pending.popleft()


class WorkerPool:
    """`workers` processes running `handler(job)` (a picklable callable) on jobs from `map`."""

    def __init__(self, handler: Callable[[Any], Any], workers: int, jobs_per_worker: int = 2) -> None:
        # "spawn": a fresh interpreter per worker, whatever threads (DALI, torch) the parent runs;
        # fork would copy locks held by those threads. The parent is then the worker's real parent.
        ctx = mp.get_context("spawn")
        self.jobs_per_worker = jobs_per_worker
        self.workers: list[_Worker] = []
        try:
            for _ in range(workers):
                job_r, job_w = ctx.Pipe(duplex=False)
                res_r, res_w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker_main, args=(handler, job_r, res_w, os.getpid()), daemon=True)
                p.start()
                job_r.close()
                res_w.close()  # the worker holds the only write end: its death is EOF here
                self.workers.append(_Worker(p, job_w, res_r, deque()))
        except BaseException:
            self.close(terminate=True)
            raise

    def map(self, jobs: Iterable[Any]) -> Iterator[Any]:
        """handler(job) for each job, in order. Raises WorkerDied when a worker ends; stop
        iterating early at will (the next map, or close(), drops what this one left in flight)."""
        for w in self.workers:  # an earlier map's leftovers: not results of these jobs
            try:
                _drop_pending(w)
            except (EOFError, OSError):
                raise WorkerDied(w.pending[0][1]) from None
        it = iter(jobs)
        done: dict[int, Any] = {}
        sent = received = 0
        exhausted = False

        def dispatch() -> None:
            nonlocal sent, exhausted
            while not exhausted:
                w = min(self.workers, key=lambda w: len(w.pending))
                if len(w.pending) >= self.jobs_per_worker:
                    return
                job = next(it, None)
                if job is None:
                    exhausted = True
                    return
                w.pending.append((sent, job))
                try:
                    w.jobs.send(job)
                except OSError:  # it died: name what it was working on, its oldest job
                    raise WorkerDied(w.pending[0][1]) from None
                sent += 1

        dispatch()
        while received < sent:
            if received in done:
                ok, value = done.pop(received)
                received += 1
                if not ok:
                    raise value
                yield value
                dispatch()
                continue
            for w in self._ready():
                seq, job = w.pending[0] if w.pending else (None, None)
                try:
                    out = w.results.recv()
                except (EOFError, OSError):  # died, possibly half-way through a message
                    raise WorkerDied(job) from None
                w.pending.popleft()
                done[seq] = out

    def _ready(self) -> list[_Worker]:
        """Workers with a result to read; raises WorkerDied for one that exited."""
        by_conn = {w.results: w for w in self.workers}
        by_sentinel = {w.process.sentinel: w for w in self.workers}
        ready = wait(list(by_conn) + list(by_sentinel))
        out = [by_conn[r] for r in ready if r in by_conn]
        for r in ready:
            w = by_sentinel.get(r)
            if w is not None and w not in out and not w.results.poll():
                raise WorkerDied(w.pending[0][1] if w.pending else None)
        return out

    def close(self, terminate: bool = False) -> None:
        """Stop the workers. Normally each finishes (and we read and drop) what it was sent, so
        no worker is ever killed half-way through writing a result; with `terminate` (an error
        or Ctrl-C) they are killed at once, which is safe because nothing waits on their pipes."""
        for w in self.workers:
            if not terminate:
                try:
                    _drop_pending(w)
                    w.jobs.send(None)
                except (EOFError, OSError):  # it died meanwhile: nothing left to wait for
                    terminate = True
        for w in self.workers:
            if terminate and w.process.is_alive():
                w.process.kill()
            w.process.join(timeout=10)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.jobs.close()
            w.results.close()
        self.workers = []


# -- the shard writer's jobs ----------------------------------------------------------------------


class Task(NamedTuple):
    stream: int
    pos: int
    relpath: str
    key: str
    size: int
    """Size as listed (file size / zip member size; NOT_REGULAR for FIFOs, sockets, devices):
    too large ones and non-regular files are skipped unopened."""


class Result(NamedTuple):
    stream: int
    pos: int
    relpath: str
    key: str
    files: list[tuple[str, bytes]] | None
    """[('jpg', bytes), ('json', bytes)] for an accepted image, None when skipped."""
    reason: str | None
    detail: str | None


class Converter:
    """Reads and converts candidates: one per process (a zip is opened once, on first use)."""

    def __init__(self, sources: list[tuple[str, str]], settings: ImageSettings) -> None:
        self.readers = [Reader(kind, Path(path)) for kind, path in sources]
        self.settings = settings

    def __call__(self, tasks: list[Task]) -> list[Result]:
        return [self.process(t) for t in tasks]

    def process(self, task: Task) -> Result:
        """Read, validate and convert one candidate; every failure becomes a skip reason."""
        limit = self.settings.max_bytes
        if task.size == NOT_REGULAR:
            return Result(*task[:4], None, NOT_A_FILE, "FIFO, socket or device: not opened")
        if task.size > limit:  # checked before reading: a zip bomb or a huge file is never inflated
            return Result(*task[:4], None, "too_large", f"{task.size} bytes > --max-bytes {limit}")
        try:
            data = self.readers[task.stream].read(task.relpath, limit)
        except NotRegularFile as e:  # replaced by a FIFO since it was listed
            return Result(*task[:4], None, NOT_A_FILE, e.strerror)
        except zipfile.BadZipFile as e:  # e.g. CRC mismatch of a damaged member
            return Result(*task[:4], None, "corrupt", str(e))
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            return Result(*task[:4], None, "unreadable", f"{type(e).__name__}: {e}")
        if len(data) > limit:  # the file grew since it was listed
            return Result(*task[:4], None, "too_large", f"more than --max-bytes {limit}")
        try:
            out = convert_image(data, self.settings)
        except Exception as e:  # a PIL plugin bug on a hostile file must not end a 118k-image run
            return Result(*task[:4], None, "corrupt", f"{type(e).__name__}: {e}")
        if not isinstance(out, Converted):
            return Result(*task[:4], None, out.reason, out.detail)
        meta = {"key": task.key, "source": task.relpath, **out.meta}
        meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        return Result(*task[:4], [("jpg", out.jpeg), ("json", meta_bytes)], None, None)


class Executor:
    """Converts tasks in `workers` processes (in the calling process when workers == 1)."""

    def __init__(self, sources: list[tuple[str, str]], settings: ImageSettings, workers: int,
                 batch: int = 8) -> None:
        self.sources, self.batch = sources, batch
        self.converter = Converter(sources, settings)
        self.pool = WorkerPool(self.converter, workers) if workers > 1 else None

    def map(self, tasks: Iterable[Task]) -> Iterator[Result]:
        """Results in task order. Stop iterating early at will: leftovers are discarded."""
        if self.pool is None:
            yield from map(self.converter.process, tasks)
            return
        it = iter(tasks)
        chunks = iter(lambda: list(islice(it, self.batch)), [])
        try:
            for results in self.pool.map(chunks):
                yield from results
        except WorkerDied as e:
            # Exactly the batch the dead worker held (the pool cannot tell which of its images).
            what = self._where(e.job) if e.job else f"an image of {self.sources[0][1]}"
            raise ShardError(
                f"a worker process died (out of memory?) while processing {what}; complete shards "
                f"are kept, run the same command again to resume") from None

    def _where(self, chunk: list[Task]) -> str:
        first = chunk[0]
        where = display_name(f"{self.sources[first.stream][1]}/{first.relpath}")
        return where if len(chunk) == 1 else f"{where} (or one of the next {len(chunk) - 1} images)"

    def close(self, terminate: bool = False) -> None:
        if self.pool is not None:
            self.pool.close(terminate)
            self.pool = None
