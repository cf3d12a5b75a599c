"""Entry point: `accelerate launch train.py [--preset NAME] [key=value ...]` (see --help)."""

import contextlib
import sys

from pix2pix_dist.train_loop import main

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):  # `train.py --help | head`
        sys.exit(main())
