"""The GPU recipe's speed paths (bf16 autocast, channels_last, fused Adam with the on-device skip,
torch.compile), run on CUDA when there is a GPU and on the CPU otherwise, so CI executes every
one of them. Only what needs CUDA itself carries the `gpu` marker (each says why); the list of
what remains GPU-only is in docs/design.md ("What only a GPU runs")."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, clean_env, run_python
from pix2pix_dist.checkpoints import list_checkpoints
from pix2pix_dist.export import load_export
from test_gan_step import HostReads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_DEVICE = pytest.mark.parametrize("device", [DEVICE])  # shows which device ran, in the test id

TINY = ["data.load_size=64", "data.crop_size=64", "model.num_downs=6", "model.ngf=8",
        "model.ndf=8", "data.batch_size=2", "data.num_threads=1", "log.sample_count=2",
        "log.tracker=none"]


@pytest.mark.gpu  # needs CUDA itself: Accelerate refuses fp16 on a CPU (GradScaler path)
def test_fp16_training_runs_finite_on_cuda(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_python(["train.py", *TINY, "train.mixed_precision=fp16",
                       f"data.shards={sample_shards}", f"run_dir={run_dir}", "train.steps=10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training on 1 process(es), cuda" in proc.stdout
    generator = load_export(run_dir / "generator.safetensors", "cuda").generator
    with torch.no_grad():
        out = generator(torch.zeros(1, 1, 64, 64, device="cuda"))
    assert torch.isfinite(out).all()


@pytest.mark.slow  # trains, stops, resumes, evaluates and colorizes in subprocesses
@ON_DEVICE
def test_bf16_train_sigterm_resume_export_eval_colorize(device, sample_shards, tmp_path):
    """The GPU recipe's precision end to end on this device: bf16 asked for explicitly runs
    (on a CPU too: no rewrite to fp32), stops on SIGTERM with a checkpoint, resumes, exports,
    and the export evaluates and colorizes."""
    run_dir = tmp_path / "run"
    args = ["train.py", *TINY, "train.mixed_precision=bf16", f"data.shards={sample_shards}",
            f"run_dir={run_dir}", "train.steps=30", "log.every=1", "log.sample_every=1000",
            "ckpt.every=1000"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stats = run_dir / "stats.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if stats.exists() and len(stats.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "train.mixed_precision" not in err  # no fallback warning: bf16 runs as asked
    assert f"training on 1 process(es), {device}" in out + err
    assert "stopped by signal" in out
    [ckpt] = list_checkpoints(run_dir)
    assert 3 <= int(ckpt.name.split("-")[1]) < 30

    resumed = run_python(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt}" in resumed.stdout and "done: 30 steps" in resumed.stdout
    assert '"mixed_precision": "bf16"' in (run_dir / "config.json").read_text()

    export = load_export(run_dir / "generator.safetensors", device)
    with torch.no_grad():
        assert torch.isfinite(export.generator(torch.zeros(1, 1, 64, 64, device=device))).all()
    ev = run_python(["-m", "pix2pix_dist.evaluate", str(run_dir), "--shards", str(sample_shards),
                     "--name", "bf16"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert (run_dir / "eval" / "bf16.json").is_file()
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image
    Image.new("RGB", (80, 64), (200, 120, 40)).save(photos / "a.jpg")
    col = run_python(["-m", "pix2pix_dist.colorize", str(photos), "--generator", str(run_dir),
                      "--output", str(tmp_path / "out")])
    assert col.returncode == 0, col.stderr[-3000:]
    assert Image.open(tmp_path / "out" / "a.png").size == (80, 64)


# --- the GAN step's speed levers, in-process, on this device ---------------------------------

@pytest.fixture
def bf16_accelerator():
    """A fresh bf16 Accelerator: its state is one per process, and other tests may have set it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(mixed_precision="bf16", cpu=DEVICE == "cpu")
    AcceleratorState._reset_state(True)


def _step(accelerator, dropout: bool = True, **train):
    from pix2pix_dist.config import Config
    from pix2pix_dist.gan_step import GanStep, build_networks

    cfg = Config()
    cfg.model.num_downs, cfg.model.ngf, cfg.model.ndf, cfg.model.dropout = 5, 8, 8, dropout
    cfg.train.channels_last = True  # explicit: on a CPU too
    for key, value in train.items():
        setattr(cfg.train, key, value)
    torch.manual_seed(0)
    nets = build_networks(cfg, accelerator)
    return nets, GanStep(accelerator, nets, cfg.optim, d_concat=cfg.train.d_concat)


def _batch(seed: int, n: int = 4):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.rand(n, 1, 32, 32, device=DEVICE, generator=gen) * 2 - 1,
            torch.rand(n, 2, 32, 32, device=DEVICE, generator=gen) - 0.5)


@ON_DEVICE
def test_fused_step_never_waits_for_the_device(device, bf16_accelerator):
    nets, step = _step(bf16_accelerator)
    assert step.skip_on_device and nets.memory_format == torch.channels_last
    for i in range(2):  # warm-up: allocator, cuDNN plans
        step(*_batch(i), stop=False)
    batches = [_batch(10 + i) for i in range(3)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            for L, ab in batches:
                result = step(L, ab)
            with pytest.raises(RuntimeError):  # the host read is a synchronisation, and is caught
                step(*batches[0], stop=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:  # a CPU never waits; count the reads that would wait on a GPU instead
        with HostReads() as reads:
            for L, ab in batches:
                result = step(L, ab)
        assert reads.count == 0
        assert step(*batches[0], stop=False).skipped == 0  # the host-read step reads
    assert result.ok.device.type == device and bool(result.ok)


@ON_DEVICE
def test_channels_last_and_bf16_hold_through_steps(device, bf16_accelerator):
    nets, step = _step(bf16_accelerator)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o))
             for net in (nets.G_raw, nets.D_raw) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    for i in range(2):
        result = step(*_batch(i))
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


@ON_DEVICE
def test_non_finite_batch_is_skipped_on_the_device(device, bf16_accelerator):
    nets, step = _step(bf16_accelerator)
    step(*_batch(0), stop=False)
    before = [p.detach().clone() for p in nets.G_raw.parameters()]
    L, ab = _batch(1)
    ab[0, 0, 0, 0] = float("nan")
    with HostReads() as reads:
        step(L, ab)
    assert reads.count == 0 or device == "cuda"  # CUDA: checked by the sync test above
    assert all(torch.equal(a, p) for a, p in zip(before, nets.G_raw.parameters()))
    assert step(*_batch(2), stop=False).skipped == 1


@pytest.mark.slow  # torch.compile (inductor) of two tiny networks: ~1 min on 2 CPU cores
@ON_DEVICE
def test_compiled_step_matches_eager_and_keeps_the_toggle_outside(device, bf16_accelerator,
                                                                   tmp_path, monkeypatch):
    # A cache of its own: inductor's shared /tmp cache is written by every compiling process on
    # the machine, and a half-written kernel there fails the load ("file too short").
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # Without dropout: compiled code draws its random numbers differently.
    _, eager = _step(bf16_accelerator, dropout=False)
    nets, compiled = _step(bf16_accelerator, dropout=False, compile=True)
    a = eager(*_batch(0), stop=False)
    b = compiled(*_batch(0), stop=False)
    for key, value in a.losses().items():  # bf16 and fused kernels: close, not equal
        torch.testing.assert_close(b.losses()[key], value, rtol=5e-2, atol=5e-3)
    for i in range(1, 3):
        b = compiled(*_batch(i), stop=False)
    assert b.skipped == 0 and all(p.requires_grad for p in nets.D_raw.parameters())
