"""`build_shards`: images -> shuffled, split, validated samples -> tar shards + indexes + manifest.

How a run goes, in order:
1. List the source(s) (names and sizes only) and give every file a unique, sanitized key.
2. Shuffle the list with the seed. This is the write order: DALI's reader only shuffles within
   a buffer while walking tars in order, so the shards themselves must be shuffled.
3. Decode/convert in a worker pool, results in order. Each accepted image goes to train or val
   by a deterministic interleaving rule (so val gets exactly round(n * f) of the accepted
   images, at least one when n >= 2), and is appended to that split's open shard. `--limit`
   counts accepted images, so `--limit 10000` gives exactly 8000 train + 2000 val.
4. A full shard is published atomically (tmp + fsync + rename, index beside it) and recorded,
   with the list of candidates it holds, in `progress.json` (also atomic). That record is what
   makes a run resumable: a re-run checks complete shards by sha256, rebuilds just the missing
   or damaged ones from their member lists, refills the open shards and continues the stream.
5. At the end `manifest.json` is written; it is the "dataset is complete" marker for loaders.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import pix2pix_dist

from ..atomic import atomic_write, file_sha256
from ..errors import ShardError
from ..files import read_text
from ..imageio import display_name
from ..locking import FolderLock
from ..shard_format import (FORMAT, MANIFEST, PROGRESS, SHARD_FILE, SPLITS, ManifestError, index_name,
                            load_manifest, manifest_records, shard_name)
from .images import ImageSettings
from .options import ShardLimit, ShardOptions, parse_max_bytes, parse_shard_size, validate
from .pool import Executor, Result, Task
from .progress import Progress
from .sources import SAMPLE, Source, assign_keys, open_source
from .writer import TarShard, sample_nbytes

MAX_EXAMPLES = 5


class _SourceChanged(Exception):
    """A file kept its name and size but not its content since the run we are resuming."""


def val_count(n: int, fraction: float) -> int:
    """Val samples among the first n accepted: round(n*f), >= 1 when n >= 2, train keeps >= 1.

    Non-decreasing with steps of 0 or 1, so sample n goes to val exactly when the count grows:
    the split is decided in one streaming pass, without knowing the final n in advance.
    """
    if fraction <= 0 or n < 2:
        return 0
    return min(max(int(n * fraction + 0.5), 1), n - 1)


class Stream:
    """One shuffled source feeding one split (`split` set) or both (by val_fraction)."""

    def __init__(self, index: int, source: Source, keys: list[str], seed: int,
                 cap: int | None, split: str | None):
        self.index, self.source, self.keys, self.cap, self.split = index, source, keys, cap, split
        self.order = list(range(len(source.candidates)))
        # Seed mixed with the stream number: train and val sources get unrelated shuffles.
        random.Random(f"{seed}:{index}").shuffle(self.order)

    def task(self, pos: int) -> Task:
        c = self.order[pos]
        cand = self.source.candidates[c]
        return Task(self.index, pos, cand.relpath, self.keys[c], cand.size)


class SplitWriter:
    """The shard sequence of one split: rolls over to a new tar at the size limit."""

    def __init__(self, out: Path, split: str, limit: ShardLimit, record: dict[str, Any]):
        self.out, self.split, self.limit = out, split, limit
        self.shards: list[dict[str, Any]] = record["shards"]
        self.members: list[int] = []
        self.current: TarShard | None = None
        self.unpublished: list[TarShard] = []

    def add(self, pos: int, key: str, files: list[tuple[str, bytes]]) -> bool:
        """Append a sample; True when this completed a shard (time to checkpoint)."""
        full = (self.current is not None and self.limit.max_bytes is not None
                and self.current.offset + sample_nbytes(files) + 1024 > self.limit.max_bytes)
        if full:
            self._finish()
        if self.current is None:
            self.current = TarShard(self.out / shard_name(self.split, len(self.shards)))
        self.current.add(key, files)
        self.members.append(pos)
        if self.limit.max_samples is not None and self.current.samples >= self.limit.max_samples:
            self._finish()
            return True
        return full

    def _finish(self) -> None:
        assert self.current is not None
        rec = self.current.finish()
        rec["members"] = self.members
        self.shards.append(rec)
        self.unpublished.append(self.current)
        self.members, self.current = [], None

    def publish(self) -> None:
        """Rename finished shards into place; call after their records were checkpointed."""
        while self.unpublished:
            self.unpublished.pop(0).publish()

    def close(self) -> None:
        if self.current is not None:
            self._finish()

    def abort(self) -> None:
        for shard in self.unpublished + ([self.current] if self.current else []):
            shard.abort()
        self.unpublished, self.current = [], None


def _fresh_state(fingerprint: str, nstreams: int) -> dict[str, Any]:
    return {
        "format": FORMAT, "fingerprint": fingerprint, "done": False,
        "positions": [0] * nstreams, "accepted": [0] * nstreams,
        "splits": {s: {"shards": [], "open": []} for s in SPLITS},
        "skipped": {}, "skipped_examples": {},
    }


def _not_ours(path: Path, reason: object) -> ShardError:
    return ShardError(f"{path} is unreadable ({reason}): damaged, or written by another tool; move it "
                      f"away (with any shards it describes) or choose another --output")


def _load_state(out: Path) -> dict[str, Any] | None:
    """The progress record of an earlier run here, None when there is none. A progress.json we
    cannot read is refused, not overwritten: it may be damaged, or another tool's file."""
    path = out / PROGRESS
    try:
        state = json.loads(read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise _not_ours(path, e) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _not_ours(path, f"not a {FORMAT} progress record")
    return state


def _owned_tmp_files(state: dict[str, Any] | None) -> set[str]:
    """The `.tmp` files a run whose progress record is `state` may have left behind: those of its
    recorded shards (killed between record and rename) and of the next two shards of each split
    (one finished and not yet recorded, one opened: a size limit rolls over to a new tar before
    the record is written). A run records its (empty) state before it creates any of them."""
    names: set[str] = set()
    for s in SPLITS if state else ():
        for number in range(len(state["splits"][s]["shards"]) + 2):
            tar = shard_name(s, number)
            names |= {f"{tar}.tmp", f"{index_name(tar)}.tmp"}
    return names


def _owned_files(out: Path, state: dict[str, Any] | None) -> set[str]:
    """Shard files (`.tmp` ones too) this tool wrote here, by the records of the earlier run
    (progress.json and manifest.json): the only shard files it may replace or remove. A
    manifest.json that is not ours is refused like a foreign progress.json."""
    records = [(s, r) for s in SPLITS for r in state["splits"][s]["shards"]] if state else []
    if (out / MANIFEST).exists():
        try:
            manifest = load_manifest(out)
        except ManifestError as e:
            raise _not_ours(out / MANIFEST, str(e).split(": ", 1)[-1]) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise _not_ours(out / MANIFEST, f"not a {FORMAT} manifest")
        records += manifest_records(manifest)[0]
    return {r[k] for _, r in records for k in ("tar", "index")} | _owned_tmp_files(state)


def _refuse_foreign_files(out: Path, owned: set[str]) -> None:
    foreign = sorted(p.name for p in out.iterdir() if SHARD_FILE.match(p.name) and p.name not in owned)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ShardError(f"{out} holds {foreign[0]}{more}, not written by this tool (no progress.json or "
                         f"manifest.json of ours lists it); move it away or choose another --output")


def _shard_intact(out: Path, rec: dict[str, Any]) -> bool:
    tar, idx = out / rec["tar"], out / rec["index"]
    try:
        if tar.stat().st_size != rec["bytes"] or not idx.is_file():
            return False
    except OSError:
        return False
    return file_sha256(tar) == rec["sha256"] and file_sha256(idx) == rec["index_sha256"]


def _prepare_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ShardError(f"output is not a folder: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ShardError(f"output folder is not writable: {out} ({e.strerror or e})") from None


class Builder:
    def __init__(self, opts: ShardOptions, log: Callable[[str], None]):
        validate(opts)
        self.opts, self.log = opts, log
        self.limit = parse_shard_size(opts.shard_size)
        self.settings = ImageSettings(min_size=opts.min_size, resize=opts.resize, quality=opts.quality,
                                      gray_tolerance=opts.gray_tolerance,
                                      max_bytes=parse_max_bytes(opts.max_bytes), max_pixels=opts.max_pixels)
        self.workers = opts.workers or os.cpu_count() or 1

        # Sources are listed before the output is touched: a missing or empty source leaves nothing.
        sources = [open_source(SAMPLE if opts.source is None else opts.source)]
        if opts.val_source is not None:
            sources.append(open_source(opts.val_source))
            if sources[1].path == sources[0].path:
                raise ShardError(f"--val-source is the same as --source ({sources[0].path}): give separate "
                                 f"validation images, or leave --val-source out to split by --val-fraction")
        self.sources = sources
        self.out = Path(opts.output) if opts.output is not None else Path("shards") / sources[0].name
        keys = assign_keys(sources)
        if len(sources) == 1:
            self.streams = [Stream(0, sources[0], keys[0], opts.seed, opts.limit, None)]
        else:
            # A separate val source is the split, so --val-fraction plays no part; --limit (a
            # random subset of all the images) is shared in proportion to the two file counts.
            n_train, n_val_files = len(sources[0].candidates), len(sources[1].candidates)
            n_val = val_count(opts.limit, n_val_files / (n_train + n_val_files)) if opts.limit else None
            train_cap = opts.limit - n_val if opts.limit else None
            self.streams = [Stream(0, sources[0], keys[0], opts.seed, train_cap, "train"),
                            Stream(1, sources[1], keys[1], opts.seed, n_val, "val")]
        self.fingerprint = self._fingerprint()

    def resolved_args(self) -> dict[str, Any]:
        """Options as resolved for this run, for the manifest. `workers`, `progress` and `verify`
        are left out on purpose: they cannot change the output, so the manifest does not depend on them."""
        args = {k: v for k, v in asdict(self.opts).items() if k not in ("workers", "progress", "verify")}
        args["source"] = str(self.sources[0].path) if self.sources[0].kind != "sample" else "sample"
        args["source_dir"] = str(self.sources[0].path)
        args["val_source"] = str(self.sources[1].path) if len(self.sources) > 1 else None
        args["output"] = str(self.out.resolve())
        args["shard_size"] = str(self.opts.shard_size)
        args["shard_max_samples"], args["shard_max_bytes"] = self.limit.max_samples, self.limit.max_bytes
        return args

    def _fingerprint(self) -> str:
        # Everything that decides the bytes of the shards, and nothing else (not paths, so a
        # moved dataset still resumes; not workers, which cannot change the output).
        content = {
            "format": FORMAT, "version": pix2pix_dist.__version__,
            "sources": [s.fingerprint() for s in self.sources],
            "settings": asdict(self.settings), "limit": self.opts.limit, "seed": self.opts.seed,
            "val_fraction": self.opts.val_fraction if len(self.sources) == 1 else None,
            "val_source": len(self.sources) > 1,
            "shard": [self.limit.max_samples, self.limit.max_bytes],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    # -- state -----------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Record progress, then publish the shards it records (record first: a shard file that
        exists under its final name is always listed, with its checksum, in progress.json)."""
        for s, w in self.writers.items():
            self.state["splits"][s]["open"] = list(w.members)
        self._save_state()
        for w in self.writers.values():
            w.publish()

    def _save_state(self) -> None:
        atomic_write(self.out / PROGRESS, json.dumps(self.state, separators=(",", ":")))

    def _skip(self, r: Result) -> None:
        reason = r.reason or "corrupt"
        self.state["skipped"][reason] = self.state["skipped"].get(reason, 0) + 1
        ex = self.state["skipped_examples"].setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            where = r.relpath if len(self.sources) == 1 else f"{self.sources[r.stream].name}/{r.relpath}"
            ex.append(display_name(where))

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        _prepare_output(self.out)
        with FolderLock(self.out, "shard writer"):
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        state = _load_state(self.out)
        owned = _owned_files(self.out, state)
        _refuse_foreign_files(self.out, owned)
        for name in owned:  # what a killed run left unfinished (we hold the folder: nobody writes)
            if name.endswith(".tmp"):
                (self.out / name).unlink(missing_ok=True)
        if state is not None and state.get("fingerprint") == self.fingerprint:
            self.state = state
            records = [(s, rec) for s in SPLITS for rec in state["splits"][s]["shards"]]
            bad = [(s, rec) for s, rec in records if not _shard_intact(self.out, rec)]
            kept = len(records) - len(bad)
            if state["done"] and not bad:
                self.log(f"up to date: all {kept} shards in {self.out} match their checksums")
                return self._write_manifest()
            (self.out / MANIFEST).unlink(missing_ok=True)  # incomplete until we are done
            self.log(f"resuming in {self.out}: {kept} complete shards kept, {len(bad)} to rebuild")
            try:
                return self._produce(bad)
            except _SourceChanged as e:
                self.log(f"{e} changed since the previous run: rebuilding all shards")
        elif state is not None or (self.out / MANIFEST).exists():
            self.log(f"options or source files changed: rebuilding all shards in {self.out}")
        for name in [MANIFEST, PROGRESS, *owned]:  # no record ever lists a removed shard file
            (self.out / name).unlink(missing_ok=True)
        self.state = _fresh_state(self.fingerprint, len(self.streams))
        for si, src in enumerate(self.sources):  # counted once per build, like unreadable files
            for folder in src.unreadable_folders:
                self._skip(Result(si, -1, folder, "", None, "unreadable", "folder cannot be listed"))
        self._save_state()  # recorded before any .tmp file exists: what makes them ours
        return self._produce([])

    def _produce(self, bad: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        self.writers = {s: SplitWriter(self.out, s, self.limit, self.state["splits"][s]) for s in SPLITS}
        sources = [(s.kind, str(s.path)) for s in self.sources]
        executor = Executor(sources, self.settings, self.workers)
        try:
            self._rebuild(executor, bad)
            self._refill(executor)
            for stream in self.streams:
                self._run_stream(executor, stream)
            for w in self.writers.values():
                w.close()
            self.state["done"] = True
            self._checkpoint()
        except BaseException:
            executor.close(terminate=True)  # nothing waits on a killed worker's pipe: see pool.py
            for w in self.writers.values():
                w.abort()
            raise
        executor.close()
        accepted = sum(len(r["members"]) for s in SPLITS for r in self.state["splits"][s]["shards"])
        if accepted == 0:
            (self.out / PROGRESS).unlink(missing_ok=True)
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.state["skipped"].items()))
            raise ShardError(f"no usable images: all were skipped ({skipped})")
        return self._write_manifest()

    def _rebuild(self, executor: Executor, bad: list[tuple[str, dict[str, Any]]]) -> None:
        """Re-create missing/damaged complete shards (split, record) from their member lists."""
        for split, rec in bad:
            shard = TarShard(self.out / rec["tar"])
            try:
                for r in self._replay(executor, split, rec["members"]):
                    shard.add(r.key, r.files)  # type: ignore[arg-type]
                if shard.finish()["sha256"] != rec["sha256"]:
                    raise _SourceChanged(f"an image of {rec['tar']}")  # same names and sizes, new bytes
                shard.publish()
            except BaseException:
                shard.abort()
                raise
            self.log(f"rebuilt {rec['tar']}")

    def _refill(self, executor: Executor) -> None:
        """Put back the samples of shards that were still open when the last run stopped."""
        for s, w in self.writers.items():
            for r in self._replay(executor, s, self.state["splits"][s]["open"]):
                w.add(r.pos, r.key, r.files)  # type: ignore[arg-type]

    def _replay(self, executor: Executor, split: str, positions: list[int]) -> Iterator[Result]:
        """Results of the candidates an earlier run accepted into `split`, at stream positions
        `positions`; _SourceChanged when one of them is no longer accepted."""
        stream = next(st for st in self.streams if st.split in (split, None))
        for r in executor.map(stream.task(p) for p in positions):
            if r.files is None:
                raise _SourceChanged(display_name(r.relpath))
            yield r

    def _run_stream(self, executor: Executor, stream: Stream) -> None:
        si, n, cap, f = stream.index, len(stream.order), stream.cap, self.opts.val_fraction
        accepted, positions = self.state["accepted"], self.state["positions"]
        name = stream.source.name
        desc = name if len(self.streams) == 1 else f"{stream.split}: {name}"
        # With a cap (--limit), progress counts accepted samples towards it; else images read.
        if cap is not None:
            progress = Progress(self.opts.progress, cap, accepted[si], "samples", desc)
        else:
            progress = Progress(self.opts.progress, n, positions[si], "img", desc)
        try:
            if cap is not None and accepted[si] >= cap:
                return
            for r in executor.map(stream.task(p) for p in range(positions[si], n)):
                completed = False
                if r.files is None:
                    self._skip(r)
                else:
                    acc = accepted[si]
                    to_val = val_count(acc + 1, f) > val_count(acc, f)
                    split = stream.split or ("val" if to_val else "train")
                    completed = self.writers[split].add(r.pos, r.key, r.files)
                    accepted[si] = acc + 1
                positions[si] = r.pos + 1
                if completed:
                    self._checkpoint()
                progress.update(accepted[si] if cap is not None else r.pos + 1,
                                sum(self.state["skipped"].values()))
                if cap is not None and accepted[si] >= cap:
                    break
        finally:
            progress.close()

    # -- outputs ---------------------------------------------------------------------------

    def _write_manifest(self) -> dict[str, Any]:
        splits = {}
        for s in SPLITS:
            shards = [{k: v for k, v in r.items() if k != "members"} for r in self.state["splits"][s]["shards"]]
            splits[s] = {"samples": sum(r["samples"] for r in shards), "bytes": sum(r["bytes"] for r in shards),
                         "shards": shards}
        manifest = {
            "format": FORMAT,
            "tool_version": pix2pix_dist.__version__,
            "dataset": self.sources[0].name,
            "args": self.resolved_args(),
            "sample": {"image": "jpg", "meta": "json"},
            "splits": splits,
            "skipped": dict(sorted(self.state["skipped"].items())),
            "skipped_examples": dict(sorted(self.state["skipped_examples"].items())),
            "candidates": {s.name if len(self.sources) == 1 else f"{st.split}:{s.name}": len(s.candidates)
                           for s, st in zip(self.sources, self.streams)},
        }
        atomic_write(self.out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return manifest


def build_shards(opts: ShardOptions) -> dict[str, Any]:
    """Write train/val shards, indexes and manifest.json to the output folder; return the manifest.

    Re-running with the same options keeps complete shards and finishes the rest. Raises
    ShardError for user-facing problems; Ctrl-C (KeyboardInterrupt) keeps complete shards.
    """
    log = partial(print, file=sys.stderr, flush=True) if opts.progress else lambda _: None
    builder = Builder(opts, log)
    try:
        return builder.run()
    except OSError as e:  # disk full, permissions changed mid-run...: complete shards are kept
        where = e.filename or builder.out
        raise ShardError(f"cannot write {where}: {e.strerror or e} (complete shards are kept; "
                         f"re-run to resume)") from None
