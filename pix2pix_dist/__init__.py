"""pix2pix_dist: distributed, high-throughput pix2pix colorization training."""

__version__ = "0.1.0"
