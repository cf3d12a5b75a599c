"""Training on CUDA: bf16 autocast, channels_last, fused Adam, torch.compile, no host
synchronisation between host-read steps (skipped without CUDA)."""

import pytest
import torch

from conftest import run_python
from pix2pix_dist.export import load_export

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
    generator = load_export(run_dir / "generator.safetensors", "cuda").generator
    with torch.no_grad():
        out = generator(torch.zeros(1, 1, 128, 128, device="cuda"))
    assert torch.isfinite(out).all()


# --- the GAN step's GPU levers, in-process ------------------------------------------------------

@pytest.fixture
def bf16_accelerator():
    """A fresh bf16 Accelerator: its state is one per process, and CPU tests may have set it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(mixed_precision="bf16")
    AcceleratorState._reset_state(True)


def _cuda_step(accelerator, dropout: bool = True, **train):
    from pix2pix_dist.config import Config
    from pix2pix_dist.gan_step import GanStep, build_networks

    cfg = Config()
    cfg.model.num_downs, cfg.model.ngf, cfg.model.ndf, cfg.model.dropout = 7, 32, 32, dropout
    for key, value in train.items():
        setattr(cfg.train, key, value)
    torch.manual_seed(0)
    nets = build_networks(cfg, accelerator)
    return nets, GanStep(accelerator, nets, cfg.optim, d_concat=cfg.train.d_concat)


def _cuda_batch(seed: int, n: int = 8):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.rand(n, 1, 128, 128, device="cuda", generator=gen) * 2 - 1,
            torch.rand(n, 2, 128, 128, device="cuda", generator=gen) - 0.5)


def test_fused_step_never_waits_for_the_device(bf16_accelerator):
    nets, step = _cuda_step(bf16_accelerator)
    assert step.skip_on_device and nets.memory_format == torch.channels_last
    for i in range(2):  # warm-up: allocator, cuDNN plans
        step(*_cuda_batch(i), stop=False)
    batches = [_cuda_batch(10 + i) for i in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for L, ab in batches:
            result = step(L, ab)
        with pytest.raises(RuntimeError):  # the host read is a synchronisation, and is caught
            step(*batches[0], stop=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result.ok.is_cuda and bool(result.ok)


def test_channels_last_and_bf16_hold_through_steps(bf16_accelerator):
    nets, step = _cuda_step(bf16_accelerator)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o))
             for net in (nets.G_raw, nets.D_raw) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    for i in range(2):
        result = step(*_cuda_batch(i))
    for h in hooks:
        h.remove()
    assert outputs and all(o.is_contiguous(memory_format=torch.channels_last) for o in outputs)
    assert all(o.dtype == torch.bfloat16 for o in outputs)
    for net in (nets.G_raw, nets.D_raw):
        for p in net.parameters():
            assert p.dtype == torch.float32
            if p.dim() == 4:
                assert p.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.isfinite(v) for v in result.losses().values())


def test_non_finite_batch_is_skipped_on_the_device(bf16_accelerator):
    nets, step = _cuda_step(bf16_accelerator)
    step(*_cuda_batch(0), stop=False)
    before = [p.detach().clone() for p in nets.G_raw.parameters()]
    L, ab = _cuda_batch(1)
    ab[0, 0, 0, 0] = float("nan")
    step(L, ab)
    assert all(torch.equal(a, p) for a, p in zip(before, nets.G_raw.parameters()))
    assert step(*_cuda_batch(2), stop=False).skipped == 1


def test_compiled_step_matches_eager_and_keeps_the_toggle_outside(bf16_accelerator):
    # Without dropout: compiled code draws its random numbers differently.
    _, eager = _cuda_step(bf16_accelerator, dropout=False)
    nets, compiled = _cuda_step(bf16_accelerator, dropout=False, compile=True)
    a = eager(*_cuda_batch(0), stop=False)
    b = compiled(*_cuda_batch(0), stop=False)
    for key, value in a.losses().items():  # bf16 and fused kernels: close, not equal
        torch.testing.assert_close(b.losses()[key], value, rtol=5e-2, atol=5e-3)
    for i in range(1, 3):
        b = compiled(*_cuda_batch(i), stop=False)
    assert b.skipped == 0 and all(p.requires_grad for p in nets.D_raw.parameters())
