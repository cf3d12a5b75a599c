"""pix2pix_dist: distributed, high-throughput pix2pix colorization training."""

from . import lifetime as _lifetime  # noqa: F401  first: it notes the launcher's pid at start-up

__version__ = "0.1.0"
