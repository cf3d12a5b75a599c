"""Training on CUDA: bf16 autocast, channels_last, fused Adam, torch.compile (skipped without CUDA)."""

import pytest
import torch

from conftest import run_python
from pix2pix_dist.checkpoints import load_generator

pytestmark = pytest.mark.gpu

TINY = ["data.load_size=128", "data.crop_size=128", "model.num_downs=7", "model.ngf=32",
        "model.ndf=32", "data.batch_size=4", "log.sample_count=2", "log.tracker=none",
        "log.every=5", "log.sample_every=10", "ckpt.every=10"]


@pytest.mark.parametrize("extra", [["train.mixed_precision=bf16"],
                                   ["train.mixed_precision=fp16"],
                                   ["train.mixed_precision=bf16", "train.compile=true"]])
def test_cuda_training_runs_finite(sample_shards, tmp_path, extra):
    run_dir = tmp_path / "run"
    proc = run_python(["train.py", *TINY, *extra, f"data.shards={sample_shards}",
                       f"run_dir={run_dir}", "train.steps=10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training on 1 process(es), cuda" in proc.stdout
    generator = load_generator(run_dir / "generator.safetensors", "cuda")
    with torch.no_grad():
        out = generator(torch.zeros(1, 1, 128, 128, device="cuda"))
    assert torch.isfinite(out).all()
