"""The ResNet-encoder U-Net (model.generator=resnet18-unet/resnet34-unet), its encoder weights
(imagenet from torch hub's cache, a local file, none) and the L1 warm-up phase: sizes, exact
weight loading, one-line errors, D untouched by the warm-up, exact resume across the phase
boundary, exports that rebuild the architecture, DDP, bf16 and channels_last on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from conftest import REPO, clean_env, free_port, run_python
from pix2pix_dist.checkpoints import list_checkpoints
from pix2pix_dist.colorize import main as colorize_main
from pix2pix_dist.config import ConfigError, build_config
from pix2pix_dist.evaluate import main as evaluate_main
from pix2pix_dist.export import ExportError, export_generator, generator_meta, load_export
from pix2pix_dist.gan_step import GanStep, build_networks
from pix2pix_dist.models import count_parameters
from pix2pix_dist.recipe import resolve_recipe
from pix2pix_dist.resnet_unet import (EncoderWeightsError, ResNetUNet, imagenet_state,
                                      load_encoder_weights)
from pix2pix_dist.train_loop import main as train_main

TINY = ["model.generator=resnet18-unet", "data.load_size=64", "data.crop_size=64",
        "model.ndf=8", "data.batch_size=2", "data.num_threads=1", "data.shuffle_buffer=16",
        "log.sample_count=2", "train.mixed_precision=no", "log.tracker=none"]


def fresh_accelerator(precision: str = "no") -> Accelerator:
    """An Accelerator with this precision (Accelerate keeps one state per process: reset it)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, mixed_precision=precision)


@pytest.fixture
def accelerator() -> Accelerator:
    return fresh_accelerator()


def resnet_file(path: Path, arch: str = "resnet18", seed: int = 3) -> Path:
    """A torchvision ResNet's state_dict (random weights, 3-channel first conv), as torch.save
    writes it: the format of torchvision's ImageNet files."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    for name, buffer in net.named_buffers():  # non-trivial BatchNorm statistics
        if "running" in name:
            buffer.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


# --- the network -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, params", [("resnet18-unet", 14_322_082), ("resnet34-unet", 24_430_242)])
def test_sizes_and_output(kind, params):
    g = ResNetUNet(kind)
    assert count_parameters(g) == params and g.num_downs == 5
    with torch.no_grad():
        y = g(torch.rand(2, 1, 64, 96) * 2 - 1)
    assert y.shape == (2, 2, 64, 96) and y.abs().max() <= 1  # tanh
    assert (y.abs() > 0.99).float().mean() < 0.05  # not saturated at initialisation


@pytest.mark.slow
def test_flops_per_image_at_256(accelerator):
    """The numbers README and docs/design.md give: one GAN step 81.9 GFLOP per 256x256 image
    (unet_256: 86.0), one warm-up step 31.7."""
    from pix2pix_dist.bench.flops import count_flops, step_flops_per_image

    cfg = build_config(None, overrides=[("model.generator", "resnet18-unet")])
    assert step_flops_per_image(cfg, accelerator, 256, batch=1) / 1e9 == pytest.approx(81.87, abs=0.01)
    nets = build_networks(cfg, accelerator)
    L, ab = torch.zeros(1, 1, 256, 256), torch.zeros(1, 2, 256, 256)
    warmup = count_flops(GanStep(accelerator, nets, cfg.optim), L, ab, warmup=True)
    assert warmup / 1e9 == pytest.approx(31.73, abs=0.01)


def test_local_file_sets_the_encoder_exactly_with_the_first_conv_summed(tmp_path, accelerator):
    file = resnet_file(tmp_path / "r18.pth")
    saved = torch.load(file, weights_only=True)
    g = ResNetUNet("resnet18-unet")
    decoder_before = {k: v.clone() for k, v in g.state_dict().items() if not k.startswith("encoder.")}
    load_encoder_weights(g, str(file), accelerator)
    encoder = g.encoder.state_dict()
    assert encoder.keys() == {k for k in saved if not k.startswith("fc.")}
    for key, value in encoder.items():
        expected = saved[key].sum(dim=1, keepdim=True) if key == "conv1.weight" else saved[key]
        assert torch.equal(value, expected), key
    for key, value in decoder_before.items():  # only the encoder changes
        assert torch.equal(g.state_dict()[key], value), key
    # Summing is exact for gray input: conv1 on L equals the 3-channel conv1 on (L, L, L).
    L = torch.rand(1, 1, 32, 32)
    three = torch.nn.functional.conv2d(L.expand(1, 3, 32, 32), saved["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(g.encoder.conv1(L), three, rtol=1e-5, atol=1e-5)


def test_imagenet_comes_from_torch_hubs_cache(tmp_path, monkeypatch):
    cached = resnet_file(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = imagenet_state("resnet18-unet")
    assert all(torch.equal(v, torch.load(cached, weights_only=True)[k]) for k, v in state.items())
    cached.write_bytes(cached.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(EncoderWeightsError, match=f"cannot read the cached {cached} .*delete it"):
        imagenet_state("resnet18-unet")


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "cannot load it"),
    ("resnet34", "is not a resnet18 state_dict (missing [], unexpected ['layer1.2.bn1.bias'"),
    ("tensor", "holds a Tensor, not a state_dict"),
])
def test_wrong_weights_file_is_one_error_line(tmp_path, accelerator, content, message):
    path = tmp_path / "w.pth"
    if content == "resnet34":
        resnet_file(path, "resnet34")
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    with pytest.raises(EncoderWeightsError) as err:
        load_encoder_weights(ResNetUNet("resnet18-unet"), str(path), accelerator)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_refuses_a_missing_file_and_a_unet_only_setting(tmp_path):
    with pytest.raises(ConfigError, match="model.encoder_weights='/nope.pth': no such file"):
        build_config(None, overrides=[("model.generator", "resnet18-unet"),
                                      ("model.encoder_weights", "/nope.pth")])
    with pytest.raises(ConfigError, match="must be divisible by 32 for model.generator=resnet34-unet"):
        build_config(None, overrides=[("model.generator", "resnet34-unet"), ("data.crop_size", 48),
                                      ("data.load_size", 48)])
    with pytest.raises(ConfigError, match="model.norm=instance is the pix2pix U-Net's option"):
        build_config(None, overrides=[("model.generator", "resnet18-unet"), ("model.norm", "instance")])


# --- the recipe ------------------------------------------------------------------------------

def test_each_phase_follows_its_own_schedule():
    cfg = build_config(None, overrides=[("train.l1_warmup_steps", 4), ("train.steps", 6),
                                        ("optim.decay_fraction", 0.5), ("optim.lr", 2e-4),
                                        ("optim.warmup_lr", 1e-4)])
    recipe = resolve_recipe(cfg, 1, train_images=100)
    assert recipe.steps == 10 and [recipe.in_warmup(s) for s in (3, 4)] == [True, False]
    assert [recipe.lr_at(s) for s in range(10)] == pytest.approx(
        [1e-4, 1e-4, 0.5e-4, 0, 2e-4, 2e-4, 2e-4, 2e-4 * 2 / 3, 2e-4 / 3, 0])


@pytest.mark.parametrize("world, per_process", [("1", 16), ("8", 2)])
def test_dry_run_of_the_preset_states_both_phases(tmp_path, monkeypatch, capsys, world, per_process):
    from test_data import write_shards

    shards = write_shards(tmp_path / "shards", "train", 32, per_shard=16, corrupt=tuple(range(32)))
    monkeypatch.setenv("WORLD_SIZE", world)
    assert train_main(["--preset", "tutorial-resnet", f"data.shards={shards}",
                       f"run_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (f"global batch 16 = {per_process}/process x {world} process(es); 80 steps = 40 epochs "
            f"of 32 train images (2 steps/epoch)") in out
    assert ("phase 1: L1 warm-up (generator alone), 40 steps = 20 epochs, lr 0.0001, constant lr; "
            "phase 2: GAN, 40 steps = 20 epochs, lr 0.0002, constant lr") in out
    assert not (tmp_path / "run").exists()


# --- the step: warm-up leaves D alone; bf16 and channels_last ---------------------------------

def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1, torch.rand(2, 2, 32, 32, generator=gen) - 0.5


@pytest.mark.parametrize("precision, layout", [("no", torch.contiguous_format),
                                               ("bf16", torch.channels_last)])
def test_warmup_trains_g_alone_and_leaves_d_bit_identical(precision, layout):
    accelerator = fresh_accelerator(precision)
    assert accelerator.mixed_precision == precision  # bf16: CPU autocast, as CI can run it
    cfg = build_config(None, overrides=[("model.generator", "resnet18-unet"), ("model.ndf", 8),
                                        ("data.crop_size", 32), ("data.load_size", 32),
                                        ("train.channels_last", layout == torch.channels_last)])
    torch.manual_seed(0)
    nets = build_networks(cfg, accelerator)
    step = GanStep(accelerator, nets, cfg.optim)
    D_before = {k: v.clone() for k, v in nets.D_raw.state_dict().items()}
    G_before = {k: v.clone() for k, v in nets.G_raw.state_dict().items()}
    step.set_lr(1e-4, warmup=True)
    for i in range(2):
        result = step(*_batch(i), warmup=True)
        assert set(result.raw_losses) == {"loss/G_L1"} and bool(result.ok)
    assert all(torch.equal(v, D_before[k]) for k, v in nets.D_raw.state_dict().items())
    assert not nets.opt_D.state_dict()["state"]  # D's Adam never stepped
    assert any(not torch.equal(v, G_before[k]) for k, v in nets.G_raw.state_dict().items())
    assert nets.opt_G.param_groups[0]["betas"] == (0.9, 0.999)
    assert nets.G_raw.encoder.conv1.weight.is_contiguous(memory_format=layout)

    step.restart_g_optimizer()  # the GAN phase: G's Adam afresh, with optim.beta1
    assert not nets.opt_G.state_dict()["state"]
    step.set_lr(2e-4)
    result = step(*_batch(5))
    assert nets.opt_G.param_groups[0]["betas"] == (0.5, 0.999)
    assert bool(result.ok) and "loss/D_real" in result.raw_losses
    assert any(not torch.equal(v, D_before[k]) for k, v in nets.D_raw.state_dict().items())


@pytest.mark.slow  # torch.compile (inductor) of the ResNet U-Net and D, both phases
def test_compiled_steps_match_eager(tmp_path, monkeypatch):
    """train.compile=true with model.generator=resnet18-unet: the GAN step and the L1 warm-up
    step, compiled on this device (CPU in CI), match eager from the same weights and batch
    (93-158 s on 2 shared CPU cores)."""
    # A cache of its own: inductor's shared /tmp cache is written by every compiling process on
    # the machine, and a half-written kernel there fails the load ("file too short").
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    accelerator = fresh_accelerator("bf16")
    runs = {}
    for compile in (False, True):
        cfg = build_config(None, overrides=[("model.generator", "resnet18-unet"), ("model.ndf", 8),
                                            ("data.crop_size", 32), ("data.load_size", 32),
                                            ("train.compile", compile)])
        torch.manual_seed(0)
        nets = build_networks(cfg, accelerator)
        step = GanStep(accelerator, nets, cfg.optim)
        step.set_lr(1e-4, warmup=True)
        warmup = step(*_batch(0), warmup=True)
        step.set_lr(2e-4)
        gan = step(*_batch(1))
        runs[compile] = (warmup, gan)  # the GAN step's losses also check the warm-up's update
    for eager, compiled in zip(runs[False], runs[True]):
        assert bool(compiled.ok) and set(compiled.raw_losses) == set(eager.raw_losses)
        for key, value in eager.losses().items():  # bf16 and fused kernels: close, not equal
            torch.testing.assert_close(compiled.losses()[key], value, rtol=5e-2, atol=5e-3)
    assert "loss/D_real" in runs[True][1].raw_losses and set(runs[True][0].raw_losses) == {"loss/G_L1"}


# --- exports -------------------------------------------------------------------------------

def test_export_names_the_architecture_and_rebuilds_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # nothing to load from, if it tried
    cfg = build_config(None, overrides=[("model.generator", "resnet34-unet"),
                                        ("data.crop_size", 64), ("data.load_size", 64)])
    g = ResNetUNet("resnet34-unet").eval()
    export_generator(g, tmp_path / "g.safetensors", generator_meta(cfg, 3))
    loaded = load_export(tmp_path / "g.safetensors").generator
    assert isinstance(loaded, ResNetUNet) and loaded.generator == "resnet34-unet"
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), g(x))
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("model, message", [
    ({"generator": "resnet50-unet", "in_channels": 1, "out_channels": 2}, "generator='resnet50-unet'"),
    ({"generator": "resnet18-unet", "in_channels": 1, "out_channels": 2, "ngf": 64},
     "resnet18-unet model metadata must have exactly the keys"),
    ({"generator": "resnet18-unet", "in_channels": 3, "out_channels": 2}, "in_channels=3"),
    ({"generator": "resnet34-unet", "in_channels": 1, "out_channels": 2}, "does not match its own model"),
])
def test_export_of_a_wrong_kind_is_refused_in_one_line(tmp_path, model, message):
    tensors = {k: v.contiguous() for k, v in ResNetUNet("resnet18-unet").state_dict().items()}
    inference = {"norm_mode": "eval", "resize": "square", "crop_size": 64, "step": 1}
    save_file(tensors, tmp_path / "g.safetensors", metadata={
        "pix2pix_dist.generator": json.dumps(model), "pix2pix_dist.inference": json.dumps(inference)})
    with pytest.raises(ExportError) as err:
        load_export(tmp_path / "g.safetensors")
    assert message in str(err.value) and "\n" not in str(err.value)


# --- end to end: train, warm-up boundary, resume, colorize, evaluate -------------------------

def _args(shards: Path, weights: Path) -> list[str]:
    return ["train.py", *TINY, f"data.shards={shards}", f"model.encoder_weights={weights}",
            "train.l1_warmup_steps=4", "train.steps=3", "log.every=1", "log.sample_every=7",
            "ckpt.every=4", "train.deterministic=true"]


@pytest.fixture(scope="module")
def straight(sample_shards, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted 4 + 3 step run from a local encoder file."""
    tmp = tmp_path_factory.mktemp("resnet")
    args = _args(sample_shards, resnet_file(tmp / "r18.pth"))
    proc = run_python([*args, f"run_dir={tmp / 'straight'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "phase 1: L1 warm-up of the generator alone, to step 4" in proc.stdout
    assert "phase 2: GAN, steps 5-7" in proc.stdout
    return tmp / "straight", args


@pytest.mark.slow
def test_warmup_leaves_d_bit_identical_and_logs_its_phase(straight, accelerator):
    run_dir, _ = straight
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1] * 4 + [2] * 3
    assert "loss/D_real" not in rows[3] and "loss/D_real" in rows[4]
    states = {int(p.name.split("-")[1]): torch.load(p / "state.pt", weights_only=True)
              for p in list_checkpoints(run_dir)}
    assert sorted(states) == [4, 7]
    at_boundary = states[4]
    assert not at_boundary["opt_D"]["state"]  # D's Adam never stepped in the warm-up
    # D as built, before any step: the same seed and construction as the run.
    from accelerate.utils import set_seed
    from pix2pix_dist.config import parse_command
    cfg = parse_command(straight[1][1:])[0]
    set_seed(cfg.train.seed)
    D = build_networks(cfg, accelerator).D_raw
    for key, value in D.state_dict().items():
        assert torch.equal(at_boundary["D"][key], value), key
    assert any(not torch.equal(states[7]["D"][k], v) for k, v in D.state_dict().items())


@pytest.mark.slow
def test_sigterm_in_the_warmup_resumes_exactly_across_the_boundary(straight, tmp_path):
    run_dir, args = straight
    interrupted = tmp_path / "interrupted"
    worker = ["tests/ddp_worker.py", "--sigterm-after", "2", *args[1:], f"run_dir={interrupted}"]
    stopped = run_python(worker, env={"PYTHONPATH": str(REPO)})
    assert stopped.returncode == 0 and "stopped by signal at step 3" in stopped.stdout, stopped.stderr[-3000:]
    assert [p.name for p in list_checkpoints(interrupted)] == ["step-00000003"]
    # Resumed without the encoder file: a resumed run never reads it.
    resumed = run_python([*args, f"run_dir={interrupted}", "model.encoder_weights=none"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 3" in resumed.stdout and "phase 2: GAN, steps 5-7" in resumed.stdout
    a, b = load_file(run_dir / "generator.safetensors"), load_file(interrupted / "generator.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(d / "checkpoints" / "step-00000007" / "state.pt", weights_only=True)
              for d in (run_dir, interrupted))
    assert all(torch.equal(sa["D"][k], sb["D"][k]) for k in sa["D"])


@pytest.mark.slow
def test_the_export_colorizes_evaluates_and_resume_refuses_another_generator(straight, tmp_path, capsys):
    run_dir, args = straight
    from PIL import Image
    from skimage import data as skdata
    Image.fromarray(skdata.astronaut()).resize((120, 90)).save(tmp_path / "a.png")
    assert colorize_main([str(tmp_path / "a.png"), "--generator", str(run_dir),
                          "--output", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (120, 90)
    assert evaluate_main([str(run_dir), "--name", "r", "--gallery", "0"]) == 0
    report = json.loads((run_dir / "eval" / "r.json").read_text())
    assert report["images"] > 0 and report["metrics"]["train_res"]["model"]["ab_l1"] > 0
    other = run_python([*args, f"run_dir={run_dir}", "model.generator=resnet34-unet", "train.steps=4"])
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "model.generator='resnet34-unet' (checkpoint: 'resnet18-unet')" in other.stderr


@pytest.mark.slow
def test_unreachable_imagenet_weights_end_the_run_in_one_line(sample_shards, tmp_path):
    """Offline without the cached file: exit 2 and one line naming the file and where it goes
    (wrong local files: test_wrong_weights_file_is_one_error_line, the same error path)."""
    # An empty hub cache, and every download refused at once by a closed local proxy port:
    # the attempt fails fast here, and nothing is ever downloaded.
    env = {"TORCH_HOME": str(tmp_path / "hub-home"), "https_proxy": f"http://127.0.0.1:{free_port()}",
           "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}", "no_proxy": "", "NO_PROXY": ""}
    proc = run_python(["train.py", *TINY, f"data.shards={sample_shards}", f"run_dir={tmp_path / 'run'}",
                       "model.encoder_weights=imagenet", "train.steps=2"], env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: model.encoder_weights=imagenet: cannot download "
                           "https://download.pytorch.org/models/resnet18-f37072fd.pth")
    assert f"copy resnet18-f37072fd.pth to {tmp_path / 'hub-home' / 'hub' / 'checkpoints'}" in line
    assert not list_checkpoints(tmp_path / "run")


@pytest.mark.slow
def test_two_gloo_processes_with_the_warmup_on_the_torch_backend(sample_shards, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
         str(free_port()), "tests/ddp_worker.py", str(tmp_path), *TINY, "data.batch_size=1",
         "data.backend=torch", f"data.shards={sample_shards}", f"run_dir={tmp_path / 'run'}",
         "model.encoder_weights=none", "train.l1_warmup_steps=2", "train.steps=2",
         "log.every=1", "ckpt.every=2"],
        cwd=REPO, env=clean_env(PYTHONPATH=f"{REPO}:{REPO / 'tests'}"), capture_output=True, text=True,
        timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training on 2 process(es)" in proc.stdout and "phase 2: GAN, steps 3-4" in proc.stdout
    views = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [v["world"] for v in views] == [2, 2] and [v["step"] for v in views] == [4, 4]
    assert not set(views[0]["batch_sums"]) & set(views[1]["batch_sums"])  # different images
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for net in ("G", "D"):
        for key in (k for k in states[0][net] if "running" not in k and "num_batches" not in k):
            assert torch.equal(states[0][net][key], states[1][net][key]), (net, key)
    boundary = torch.load(tmp_path / "run" / "checkpoints" / "step-00000002" / "state.pt",
                          weights_only=True)
    assert not boundary["opt_D"]["state"]  # no D update in the warm-up, on any rank
