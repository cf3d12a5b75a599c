"""The shared GAN step's speed levers on CPU in fp32: each gives the reference's results where the
math is the same, keeps its layout, skips non-finite steps on every rank, and reads the host only
when asked. The same levers under bf16, on CUDA when present and else on the CPU (with the CUDA
synchronisation check itself where there is a GPU), are in tests/test_training_gpu.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, clean_env, run_python
from pix2pix_dist.config import Config
from pix2pix_dist.gan_step import GanStep, Networks, build_networks

CROP = 32


def tiny_config(**train: object) -> Config:
    cfg = Config()
    cfg.model.num_downs, cfg.model.ngf, cfg.model.ndf = 5, 4, 4
    cfg.train.mixed_precision = "no"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def batch(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, CROP, CROP, generator=gen) * 2 - 1,
            torch.rand(n, 2, CROP, CROP, generator=gen) - 0.5)


def make(accelerator, cfg: Config) -> tuple[Networks, GanStep]:
    torch.manual_seed(0)
    nets = build_networks(cfg, accelerator)
    return nets, GanStep(accelerator, nets, cfg.optim, d_concat=cfg.train.d_concat)


def params(nets: Networks) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone()
            for name, net in (("G", nets.G_raw), ("D", nets.D_raw))
            for k, v in net.state_dict().items()}


def run_steps(accelerator, cfg: Config, steps: int = 3,
              losses: list | None = None) -> dict[str, torch.Tensor]:
    """Parameters after `steps` steps; each step's losses are appended to `losses`."""
    nets, step = make(accelerator, cfg)
    torch.manual_seed(1)  # the same dropout noise in every variant
    for i in range(steps):
        result = step(*batch(i))
        if losses is not None:
            losses.append(torch.stack(list(result.losses().values())))
    return params(nets)


def assert_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=k)


def test_fused_adam_gives_plain_adams_results(accelerator):
    fused = run_steps(accelerator, tiny_config(fused_adam=True))
    plain = run_steps(accelerator, tiny_config(fused_adam=False))
    initial = params(make(accelerator, tiny_config())[0])
    assert any(not torch.equal(fused[k], initial[k]) for k in fused)  # it trained
    assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_d_concat_is_exact_without_batchnorm_and_changes_batchnorm_statistics(accelerator):
    def variant(norm: str, d_concat: bool) -> tuple[dict, torch.Tensor]:
        cfg = tiny_config(d_concat=d_concat)
        cfg.model.norm = norm
        losses: list[torch.Tensor] = []
        return run_steps(accelerator, cfg, steps=3, losses=losses), torch.stack(losses)

    # InstanceNorm normalises each image alone: one forward over both halves is the same math.
    # (Losses, not parameters: Adam turns the float noise on a bias with no true gradient, such
    # as one right before a norm layer, into full-size steps that change no output.)
    torch.testing.assert_close(variant("instance", True)[1], variant("instance", False)[1],
                               rtol=1e-4, atol=1e-6)
    (one, one_losses), (two, two_losses) = variant("batch", True), variant("batch", False)
    assert not torch.allclose(one_losses, two_losses, rtol=1e-3)
    running = [k for k in one if k.startswith("D.") and "running_mean" in k]
    assert running and any(not torch.allclose(one[k], two[k]) for k in running)


def test_channels_last_survives_the_step(accelerator):
    cl = torch.channels_last
    nets, step = make(accelerator, tiny_config(channels_last=True))
    layouts: list[tuple[str, bool]] = []

    def record(module, inputs, output):
        layouts.append((type(module).__name__, output.is_contiguous(memory_format=cl)))

    convs = [m for net in (nets.G_raw, nets.D_raw) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    hooks = [m.register_forward_hook(record) for m in convs]
    L, ab = batch(0)
    step(L, ab)
    for h in hooks:
        h.remove()
    assert len(layouts) > len(convs)  # G once, D three times (fake, real, G step)
    assert all(ok for _, ok in layouts), [name for name, ok in layouts if not ok]
    for net, opt in ((nets.G_raw, nets.opt_G), (nets.D_raw, nets.opt_D)):
        for p in net.parameters():
            if p.dim() == 4:
                assert p.is_contiguous(memory_format=cl)
                assert opt.state[p]["exp_avg"].is_contiguous(memory_format=cl)
    # The same step in the default layout gives the same numbers.
    assert_close(run_steps(accelerator, tiny_config(channels_last=True)),
                 run_steps(accelerator, tiny_config()), rtol=1e-4, atol=1e-5)
    # `auto` is the device's default: NCHW on a CPU (measured faster there), channels_last on CUDA.
    assert make(accelerator, tiny_config())[0].memory_format == torch.contiguous_format


class HostReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense, the op behind .item(), float(t), bool(t) and `if t:`:
    on CUDA each one waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_fused_step_returns_device_flags_and_never_reads_the_host(accelerator):
    nets, step = make(accelerator, tiny_config(fused_adam=True))
    assert step.skip_on_device
    with HostReads() as reads:
        result = step(*batch(0))
    assert reads.count == 0
    assert isinstance(result.ok, torch.Tensor) and result.ok.dtype == torch.bool
    assert result.skipped is None and result.stop is False
    # The counter sees reads: plain Adam decides each skip on the host (and, on a CPU, also
    # reads its step counts, which live on the host anyway).
    _, plain = make(accelerator, tiny_config(fused_adam=False))
    with HostReads() as reads:
        plain(*batch(0))
    assert reads.count >= 2


def test_non_finite_loss_skips_the_update_on_the_device(accelerator):
    nets, step = make(accelerator, tiny_config(fused_adam=True))
    step(*batch(0), stop=False)
    before = params(nets)
    steps_before = [s["step"].item() for s in nets.opt_G.state.values()]
    L, ab = batch(1)
    ab[0, 0, 0, 0] = float("nan")
    result = step(L, ab)
    assert not result.ok.item()
    assert all(torch.isfinite(v).all() for v in result.losses().values())  # zeroed, summable
    after = params(nets)
    for k in before:
        if "running" not in k and "num_batches" not in k:  # BatchNorm still saw the batch
            assert torch.equal(before[k], after[k]), k
    assert [s["step"].item() for s in nets.opt_G.state.values()] == steps_before
    good = step(*batch(2), stop=True)
    assert good.ok.item() and good.skipped == 1 and good.stop is True  # counted until read
    assert step(*batch(3), stop=False).skipped == 0


@pytest.mark.slow  # two gloo processes
def test_two_gloo_ranks_skip_a_non_finite_step_together(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2",  # standalone: a free port
         "tests/gan_step_worker.py", str(tmp_path)],
        cwd=REPO, env=clean_env(PYTHONPATH=f"{REPO}:{REPO / 'tests'}"), capture_output=True,
        text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    views = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [v["world"] for v in views] == [2, 2]
    for v in views:
        # Only rank 1 saw a NaN, but both skipped; rank 0 alone asked to stop, both stop.
        assert v["skipped"] == [0, 1, 0] and v["stop"] == [False, True, False]
        for k in v["params"][0]:
            assert torch.equal(v["params"][0][k], v["params"][1][k]), k
            assert torch.isfinite(v["params"][2][k]).all()
        assert any(not torch.equal(v["params"][1][k], v["params"][2][k]) for k in v["params"][1])
    for i in range(3):
        for k in views[0]["params"][i]:
            assert torch.equal(views[0]["params"][i][k], views[1]["params"][i][k]), (i, k)


@pytest.mark.slow  # a training run
def test_the_loop_reads_skipped_steps_every_sync_every_steps(sample_shards, tmp_path):
    # Every step is non-finite (NaN targets); with train.sync_every=4 the host first hears of it
    # at step 4, all four at once, and stops there (train.max_nonfinite=3).
    proc = run_python(["tests/nan_worker.py", "data.load_size=64", "data.crop_size=64",
                       "model.num_downs=6", "model.ngf=8", "model.ndf=8", "data.batch_size=2",
                       "data.num_threads=1", "log.sample_count=2", "train.mixed_precision=no",
                       f"data.shards={sample_shards}", f"run_dir={tmp_path / 'run'}",
                       "train.steps=50", "log.every=50", "train.sync_every=4",
                       "train.max_nonfinite=3", "log.tracker=none"], env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 4 steps had non-finite losses")
    assert proc.stderr.count("update skipped") == 1
    assert "non-finite loss in 4 step(s) up to step 4" in proc.stderr


def test_auto_speed_settings_resolve_per_device_and_explicit_ones_are_kept():
    from pix2pix_dist.config import parse_command
    from pix2pix_dist.device_defaults import cpu_has_native_bf16, resolve_train

    auto = parse_command([])[0].train
    assert (auto.mixed_precision, auto.channels_last) == ("auto", None)
    gpu, cpu = resolve_train(auto, "cuda"), resolve_train(auto, "cpu")
    assert (gpu.mixed_precision, gpu.channels_last) == ("bf16", True)
    assert (cpu.mixed_precision, cpu.channels_last) == ("bf16" if cpu_has_native_bf16() else "no",
                                                        False)
    given = parse_command(["train.mixed_precision=bf16", "train.channels_last=true"])[0].train
    assert resolve_train(given, "cpu") == given  # an explicit request runs as asked, on a CPU too
    assert parse_command(["train.channels_last=auto"])[0].train.channels_last is None
    assert parse_command(["train.channels_last=false"])[0].train.channels_last is False
