"""Entry point: `accelerate launch train.py [--preset NAME] [key=value ...]` (see --help)."""

import sys

from pix2pix_dist.train_loop import main

if __name__ == "__main__":
    sys.exit(main())
