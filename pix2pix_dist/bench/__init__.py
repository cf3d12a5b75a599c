"""Throughput benchmark: input pipelines and the training step, in one run, as ratios.

    python -m pix2pix_dist.bench                     # COCO-like synthetic shards, no download
    python -m pix2pix_dist.bench --shards shards/coco --compile

Input pipeline (images/s, on the same shards, batches delivered on the device):
  dali      build_loader(backend="dali"): decode + resize + crop + flip + Lab ("mixed" GPU decode)
  torch     build_loader(backend="torch"): our webdataset + DataLoader fallback
  tutorial  the well-known COCO colorization tutorial's loader, reproduced here: per sample PIL
            open + RGB, Resize((S, S), BICUBIC), RandomHorizontalFlip, np.array, skimage rgb2lab,
            L/50-1, ab/110, in a DataLoader with N workers, batches moved to the device.
Training step (images/s, ms/step, TFLOP/s, peak GPU memory): the real pix2pix D step + G step on
synthetic on-device batches, eager and (with --compile) torch.compile.

Results go to stdout as a table and to bench_results/<date>-<device>.json and .md. Speed targets
live here (printed as PASS/FAIL on CUDA), never in unit tests.
"""

from .cli import main

__all__ = ["main"]
