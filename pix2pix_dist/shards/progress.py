"""Progress display: a tqdm bar with images/s on a terminal, a few plain lines in logs."""

from __future__ import annotations

import sys
import time


class Progress:
    """`update(done, skipped)` with absolute counts. Non-TTY output (CI logs, nohup, SLURM files)
    gets one short line every 30 seconds instead of a carriage-return bar per update."""

    def __init__(self, enabled: bool, total: int | None, initial: int, unit: str, desc: str):
        self.enabled, self.total, self.unit, self.desc = enabled, total, unit, desc
        self.bar = None
        self.done = self.start = initial
        self.t0 = self.last = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True,
                            smoothing=0.05, file=sys.stderr)

    def update(self, done: int, skipped: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.done)
            if self.bar.n % 64 == 0:
                self.bar.set_postfix(skipped=skipped, refresh=False)
        else:
            now = time.perf_counter()
            if now - self.last >= 30.0:
                rate = (done - self.start) / max(now - self.t0, 1e-9)
                total = f"/{self.total}" if self.total else ""
                print(f"{self.desc}: {done}{total} {self.unit}, {rate:.0f} {self.unit}/s, {skipped} skipped",
                      file=sys.stderr, flush=True)
                self.last = now
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
