"""train.py that sends itself SIGTERM right after its Nth training step: a deterministic stop
point for resume tests (usage: sigterm_worker.py N [key=value ...])."""

import os
import signal
import sys

from pix2pix_dist import train_loop


def stop_after(n: int) -> None:
    class SignallingStep(train_loop.GanStep):
        calls = 0

        def __call__(self, *args, **kwargs):
            result = super().__call__(*args, **kwargs)
            SignallingStep.calls += 1
            if SignallingStep.calls == n:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's own stop_signals
            return result

    train_loop.GanStep = SignallingStep


if __name__ == "__main__":
    stop_after(int(sys.argv[1]))
    sys.exit(train_loop.main(sys.argv[2:]))
