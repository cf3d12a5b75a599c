"""Throughput benchmark: the reference step against ours, end to end, and the input pipelines.

    python -m pix2pix_dist.bench                     # COCO-like synthetic shards, no download
    python -m pix2pix_dist.bench --shards shards/coco --compile --batch-sweep 64,128,256

Training (point.py): the real training loop (train_loop.train) fed from shards by the real
loader, each point in its own process (or --processes N of them under torchrun): the reference
step (the original pix2pix habits: fp32, NCHW, eager, plain Adam; the same networks, losses and
data) and ours at the same batch (with N > 1 ours twice: model.norm=batch and batch_local), then
ours over a batch sweep. Per point: images/s, step-only images/s, data-wait fraction and so the
bottleneck, peak GPU memory; TFLOP/s and MFU from the FLOPs counted on the real step (flops.py).

Input pipeline alone (images/s, on the same shards, batches delivered on the device):
  dali      build_loader(backend="dali"): decode + resize + crop + flip + Lab ("mixed" GPU decode)
  torch     build_loader(backend="torch"): our webdataset + DataLoader fallback
  tutorial  the well-known COCO colorization tutorial's loader, reproduced here: per sample PIL
            open + RGB, Resize((S, S), BICUBIC), RandomHorizontalFlip, np.array, skimage rgb2lab,
            L/50-1, ab/110, in a DataLoader with N workers, batches moved to the device.

Results go to stdout as a table and to benchmarks/results/<date>-<device>.json and .md. Speed
targets live here (PASS/FAIL on CUDA with the default networks), never in unit tests.
"""



def main(argv: list[str] | None = None) -> int:
    """`python -m pix2pix_dist.bench` (cli.py). Imported on call: a training point's child
    (`python -m pix2pix_dist.bench.point`, one per process) then loads none of the benchmark's
    own modules, and runs point.py once, as __main__."""
    from .cli import main as run

    return run(argv)


__all__ = ["main"]
