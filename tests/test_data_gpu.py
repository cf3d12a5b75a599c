"""Input pipeline on a CUDA GPU: DALI's mixed (nvJPEG/hardware) decoder, torchvision's nvJPEG
path, and batches that stay on the device. Every test here needs CUDA itself (those operators
and device-resident batches exist only on a GPU; the same pipelines' CPU paths are tested in
tests/test_data.py), so the module keeps the gpu marker and skips cleanly without CUDA."""

from __future__ import annotations

import pytest
import torch

from test_data import BACKENDS, config, epoch, write_shards

from pix2pix_dist.data import build_loader
from pix2pix_dist.data.shards_index import find_shards

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs CUDA itself: DALI mixed decode, nvJPEG, GPU batches")]
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_shards")
    write_shards(out, "train", 40, per_shard=16)
    write_shards(out, "val", 16, per_shard=16)
    return out


def _loader(root, backend, split, device):
    return build_loader(find_shards(root, split), config(root, backend), batch_size=4, rank=0,
                        world_size=1, device=device, seed=0)


def test_dali_decodes_on_the_gpu_without_a_host_round_trip(shards):
    from nvidia.dali.backend import TensorListGPU

    from pix2pix_dist.data.dali_pipeline import build_pipeline

    pipe = build_pipeline(find_shards(shards, "val"), config(shards, "dali"), batch_size=4,
                          train=False, rank=0, world_size=1, device_id=0, seed=0)
    pipe.build()
    (rgb,) = pipe.run()
    assert isinstance(rgb, TensorListGPU)  # "mixed" decode, resize and crop all on the GPU
    L, ab = next(iter(_loader(shards, "dali", "val", CUDA)))
    assert L.device == ab.device == CUDA and L.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_batches_match_cpu_batches(shards, backend):
    """Same samples as the CPU path and the same colours per image (decoders differ slightly)."""
    gpu = {k: (L[i], ab[i]) for L, ab, ks in epoch(_loader(shards, backend, "val", CUDA), True)
           for i, k in enumerate(ks)}
    cpu = {k: (L[i], ab[i]) for L, ab, ks in epoch(_loader(shards, backend, "val", torch.device("cpu")), True)
           for i, k in enumerate(ks)}
    assert sorted(gpu) == sorted(cpu) and len(gpu) == 16
    for key, (L, ab) in gpu.items():
        assert L.is_cuda and L.shape == (1, 64, 64) and ab.shape == (2, 64, 64)
        L_c, ab_c = cpu[key]
        assert (L.mean().cpu() - L_c.mean()).abs() < 0.01, key
        assert (ab.mean((1, 2)).cpu() - ab_c.mean((1, 2))).abs().max() < 0.015, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_training_epochs(shards, backend):
    ld = _loader(shards, backend, "train", CUDA)
    for _ in range(2):
        batches = epoch(ld)
        assert len(batches) == len(ld) == 10
        assert all(L.is_cuda and L.shape == (4, 1, 64, 64) and L.is_contiguous() for L, _ in batches)
