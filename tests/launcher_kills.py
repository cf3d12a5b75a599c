"""SIGKILL `accelerate launch` (two gloo ranks of a real training) at seeded random times in its
first seconds; report every process of the run still alive 30 s after the kill.

    PYTHONPATH=. .venv/bin/python tests/launcher_kills.py --kills 20 --within 15 [--from-ranks]

Exit status 1 when any process outlived its launcher (they are SIGKILLed before exiting).
tests/test_reliability.py runs the deterministic core of this (ranks frozen during start-up).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO  # noqa: E402
from test_reliability import launch, running  # noqa: E402
from test_training import TINY  # noqa: E402


def tree(pid: int) -> list[int]:
    """The processes below `pid` now; threads and processes that end while we look are passed
    over (the launcher's threads come and go)."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    for task in tasks:
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for kid in kids:
            found += [kid, *tree(kid)]
    return sorted(set(found))


def one_kill(shards: Path, at: float, work: Path, grace: float, from_ranks: bool
               ) -> tuple[int, list[int]]:
    """(processes below the launcher when it was SIGKILLed `at` seconds after its start, or
    after its first rank appeared (`from_ranks`), those of the run still running `grace`
    seconds later)."""
    log = work / f"kill-{at:.2f}.log"
    launcher = launch(["train.py", *TINY, f"data.shards={shards}", f"run_dir={work / f'run-{at:.2f}'}",
                       "train.steps=100000", "log.tracker=none"], log)
    seen: set[int] = set()
    start = time.monotonic()
    while from_ranks and not seen and time.monotonic() - start < 300:
        seen.update(tree(launcher.pid))
        time.sleep(0.005)
    start = time.monotonic() if from_ranks else start
    while time.monotonic() - start < at:  # every process the run starts, until the kill
        seen.update(tree(launcher.pid))
        time.sleep(0.02)
    started = len(seen)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < grace:  # and whatever its ranks start afterwards
        for pid in list(seen):
            seen.update(tree(pid))
        time.sleep(0.2)
    alive = [pid for pid in seen if running(pid)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return started, alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--within", type=float, default=15.0, help="kill times in [0.2, WITHIN) s")
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-ranks", action="store_true",
                        help="count kill times from the first rank's start, not the launcher's "
                             "(on a loaded machine the launcher alone can take 15 s)")
    parser.add_argument("--shards", type=Path, help="default: build small sample shards")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    times = sorted(rng.uniform(0.2, args.within) for _ in range(args.kills))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = args.shards
        if shards is None:
            from pix2pix_dist.shards import ShardOptions, build_shards
            shards = work / "shards"
            build_shards(ShardOptions(source="sample", output=shards, val_fraction=0.2,
                                      shard_size="4", seed=0, workers=2, progress=False, resize=96))
        failures = 0
        for at in times:
            started, alive = one_kill(shards, at, work, args.grace, args.from_ranks)
            failures += bool(alive)
            print(f"kill at {at:5.2f} s ({started} process(es) below the launcher): {len(alive)} "
                  f"alive {args.grace:.0f} s later" + (f" {alive}" if alive else ""), flush=True)
    print(f"{failures} of {len(times)} kills left processes behind (repo {REPO})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
