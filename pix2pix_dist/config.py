"""Typed run configuration: dataclasses with a docstring per field, presets, command line.

A run is described by one `Config`, built in this order: defaults, a preset (`--preset NAME`),
a JSON file (`--config FILE.json`, an object like a run's config.json), then command-line
overrides (`data.global_batch=32` or `--data.global_batch 32`). The command line is derived from
these dataclasses by pix2pix_dist/cli.py (tyro): choices are `Literal` types, `--help` lists
every key with its default and docstring. Range checks live in `Config.validate`; every problem
is one line naming the key. The resolved config is saved as `config.json` in the run folder.

A preset is a *recipe* in global terms (images per optimizer step over all processes, run length
in epochs); the per-process batch and the step count follow from the world size and the train
split's size (recipe.py, docs/design.md "Recipes").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro
from tyro.constructors import PrimitiveConstructorSpec

from .atomic import atomic_write
from .cli import CliError, expand_key_values, parse
from .files import read_text


ConfigError = CliError  # a preset, config file or key is part of the command line: one error type


def _read_bool(args: list[str]) -> bool:
    value = args[0].lower() if args else "true"  # a bare flag: `--dry-run`
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {args[0]!r}")


def _bool_option(nargs: int | tuple[int, ...], metavar: str, auto: bool = False) -> Any:
    """A boolean key's parser; with `auto`, the value `auto` is also accepted, stored as None."""
    def read(args: list[str]) -> bool | None:
        return None if auto and args[0].lower() == "auto" else _read_bool(args)

    return Annotated[bool | None if auto else bool, PrimitiveConstructorSpec(
        nargs=nargs, metavar=metavar, instance_from_str=read,
        is_instance=lambda value: isinstance(value, bool) or (auto and value is None),
        str_from_instance=lambda value: ["auto" if value is None else "true" if value else "false"]),
        tyro.conf.FlagConversionOff]


# A boolean key takes a value (`train.compile=true`, any case, or 1/0, yes/no, on/off) like every
# other key, instead of tyro's `--flag/--no-flag` pair: `key=value` is the spelling users know.
BoolValue = _bool_option(1, "{true,false}")
# A command's switch (`--dry-run`) is also a bare flag, meaning true.
FlagValue = _bool_option((0, 1), "[{true,false}]")
# A speed option whose default depends on the device: `auto` (stored as None) is resolved by
# device_defaults.py; `true`/`false` are used as given on any device.
AutoBoolValue = _bool_option(1, "{auto,true,false}", auto=True)


Norm = Literal["batch", "batch_local", "instance"]
"""model.norm's choices; models.norm_layer builds them (docs/design.md, "BatchNorm over the
recipe's batch")."""
RENAMED_NORMS = {"syncbatch": "batch"}
"""Old model.norm names in config files, checkpoints and exports -> today's name."""


@dataclass
class DataConfig:
    shards: str = "shards/coco"
    """Folder written by `make shards` (holds manifest.json and {train,val}-NNNNNN.tar)."""
    backend: Literal["auto", "dali", "torch"] = "auto"
    """Input pipeline: `dali` (GPU decode), `torch` (webdataset + DataLoader), or `auto`
    (DALI where it is installed, else torch with a one-line warning)."""
    global_batch: int = 16
    """Images per optimizer step over all processes (the recipe's batch). Each process takes
    global_batch / processes, so the number of processes must divide it."""
    batch_size: int = 0
    """Per-process batch, to pin it instead of data.global_batch (which is then ignored: the
    global batch becomes batch_size x processes). 0: derived from data.global_batch."""
    load_size: int = 286
    """Images are resized to this (see data.resize) before the crop (pix2pix: 286)."""
    crop_size: int = 256
    """Square training crop (pix2pix: 256); must be divisible by 2**model.num_downs."""
    resize: Literal["shorter_side", "square"] = "shorter_side"
    """Training geometry: `square` resizes the whole image to `load_size` x `load_size` before
    the random `crop_size` crop (pix2pix's `resize_and_crop`; the tutorial's squash when both are
    256); `shorter_side` resizes the shorter side to `load_size`, keeping the aspect ratio,
    before the crop (ours). Validation and evaluation use the same resize and the centre crop;
    colorize squashes, or scales the shorter side, to the crop size (the whole photo)."""
    random_resized_crop: BoolValue = False
    """Use a random-resized crop (scale `rrc_min_scale`..1) instead of resize + random crop."""
    rrc_min_scale: float = 0.35
    """Smallest area fraction kept by the random-resized crop."""
    flip: BoolValue = True
    """Random horizontal flip for training batches (never for validation)."""
    shuffle_buffer: int = 2048
    """Samples held by the reader's shuffle buffer (shards are also shuffled at write time)."""
    num_threads: int = 4
    """CPU threads of the DALI pipeline, or DataLoader workers of the torch backend."""
    hw_decoder_load: float = 0.65
    """Share of JPEG decoding sent to the hardware decoder (A100/H100) by DALI's mixed decoder."""
    prefetch: int = 2
    """Batches prepared ahead of the training step."""


@dataclass
class ModelConfig:
    generator: Literal["unet", "resnet18-unet", "resnet34-unet"] = "unet"
    """`unet`: pix2pix's U-Net (unet_256 at num_downs 8), trained from scratch; `resnet18-unet` /
    `resnet34-unet`: a U-Net whose encoder is a ResNet (the COCO tutorial's final model; starts
    from model.encoder_weights; inputs multiples of 32; ngf, num_downs, norm and dropout are the
    U-Net's and do not apply). README: "Which generator"."""
    encoder_weights: str = "imagenet"
    """Starting weights of a ResNet encoder: `imagenet` (torchvision's, via torch hub's cache:
    downloaded once when online), `none` (random), or a local torch.save'd ResNet state_dict.
    A 3-channel first convolution is summed over its channels. Read only when a run starts fresh
    (a resumed run has its weights, so a resume may name another source or none)."""
    ngf: int = 64
    """Generator filters in the first layer (pix2pix: 64)."""
    num_downs: int = 8
    """Generator stride-2 downsamplings: 8 is unet_256, 7 is unet_128."""
    ndf: int = 64
    """Discriminator filters in the first layer (pix2pix: 64)."""
    d_layers: int = 3
    """Discriminator stride-2 layers: 3 gives the 70x70 PatchGAN."""
    norm: Norm = "batch"
    """Normalisation: `batch`: BatchNorm over the global batch, i.e. statistics over every
    process's images (cross-process when there is more than one; the recipe's math on any
    number of processes); `batch_local`: BatchNorm over each process's own images (no
    communication, but the statistics change with the number of processes); `instance`:
    InstanceNorm. (`syncbatch`, the old name of `batch`, is read from old config files.)"""
    dropout: BoolValue = True
    """Dropout 0.5 in the three innermost 512-channel generator blocks (pix2pix's noise)."""


@dataclass
class OptimConfig:
    gan_mode: Literal["vanilla", "lsgan", "hinge"] = "vanilla"
    """GAN loss: `vanilla` (BCE with logits), `lsgan` or `hinge`."""
    lambda_l1: float = 100.0
    """Weight of the L1 loss on ab against the GAN loss."""
    lr: float = 2e-4
    """Adam learning rate for both networks at the global batch optim.reference_batch."""
    reference_batch: int = 16
    """The global batch optim.lr is meant for (a preset sets it to its own data.global_batch)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Learning rate at another global batch: `none` keeps optim.lr, `linear` multiplies it by
    global batch / optim.reference_batch, `sqrt` by the square root of that ratio."""
    beta1: float = 0.5
    """Adam beta1 (pix2pix: 0.5)."""
    beta2: float = 0.999
    """Adam beta2."""
    decay_fraction: float = 0.5
    """Final share of each phase's steps (the L1 warm-up's, then the GAN's) over which its
    learning rate decays linearly, reaching exactly 0 at the phase's last step (pix2pix: 0.5, its
    second half); 0 keeps it constant."""
    warmup_lr: float = 1e-4
    """Adam learning rate of the L1 warm-up (train.l1_warmup_epochs) at optim.reference_batch
    (the tutorial: 1e-4), scaled like optim.lr."""
    warmup_beta1: float = 0.9
    """Adam beta1 of the L1 warm-up (the tutorial's pretraining uses Adam's default, 0.9). The
    GAN phase starts G's Adam afresh with optim.beta1, as the tutorial's new optimizer does."""


@dataclass
class TrainConfig:
    epochs: float = 100.0
    """Run length in passes over the train split (the recipe): steps = epochs x steps per epoch,
    where an epoch is train images // global batch steps."""
    steps: int = 0
    """Pin the run length in optimizer steps instead of train.epochs (0: derived from it)."""
    l1_warmup_epochs: float = 0.0
    """Epochs of an L1 warm-up before the GAN phase (the tutorial's pretraining: 20): the
    generator alone, L1 loss, optim.warmup_lr; the discriminator is untouched. train.epochs
    (or train.steps) is the GAN phase that follows."""
    l1_warmup_steps: int = 0
    """Pin the warm-up's length in optimizer steps instead of train.l1_warmup_epochs."""
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """`auto` (the device's measured fastest: bf16 on CUDA and on CPUs with native bf16, else
    `no`), `bf16` (autocast, also on a CPU), `fp16` (CUDA only; `no` with a notice elsewhere) or
    `no` (fp32)."""
    channels_last: AutoBoolValue = None
    """channels_last memory format for the networks and batches: `auto` (on CUDA, where it makes
    convolutions faster; off on a CPU, where it measured slower), `true` or `false`."""
    compile: BoolValue = False
    """Wrap both networks in torch.compile (slow first steps, faster afterwards)."""
    fused_adam: BoolValue = True
    """Fused Adam kernels (CUDA and CPU): faster, and a step with a non-finite loss is skipped on
    the device, without a host synchronisation. `false`: plain Adam (the reference's), checked on
    the host after each backward pass."""
    sync_every: int = 1
    """Steps between the host's reads of the step's flags (skipped non-finite steps, a stop
    request from SIGTERM/Ctrl-C); also read at log and checkpoint steps. 1: one synchronisation
    per step; larger: the host runs ahead of the GPU, and a signal is acted on within this many
    steps."""
    d_concat: BoolValue = False
    """One discriminator forward over the real and generated pairs together instead of two.
    Changes the math: BatchNorm statistics are then computed over both halves at once."""
    seed: int = 0
    """Seed for weights, augmentation and shuffling."""
    deterministic: BoolValue = False
    """Deterministic algorithms, and data epochs that depend only on (seed, epoch), so a resumed
    run ends with the same weights as an uninterrupted one (slower; for debugging and tests)."""
    max_nonfinite: int = 50
    """Stop the run with an error after this many steps with a non-finite loss (each is skipped)."""


@dataclass
class LogConfig:
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"
    """`wandb` (offline automatically when no credentials are configured), `tensorboard` or `none`."""
    project: str = "pix2pix-dist"
    """Tracker project name."""
    every: int = 50
    """Log scalars (losses, lr, images/s, data wait, memory) every this many steps."""
    sample_every: int = 500
    """Log a sample grid (gray | prediction | truth) every this many steps and at the end."""
    sample_count: int = 8
    """Images in the sample grid, taken from a fixed validation batch."""


@dataclass
class EvalConfig:
    norm_mode: Literal["batch", "eval"] = "eval"
    """How inference (colorize, evaluate, sample grids) runs BatchNorm and dropout: `batch` uses
    each batch's statistics with dropout on (pix2pix's test mode, right for batch-1 recipes whose
    running statistics never matched what the network saw); `eval` uses running statistics without
    dropout (the tutorial's model.eval())."""
    every: int = 0
    """Evaluate on a fixed subset of the val split every this many steps and log eval/* scalars
    (0: never)."""
    count: int = 64
    """Validation images in that subset (at most the split's size)."""


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save a full training-state checkpoint every this many steps (and at the end)."""
    keep: int = 3
    """Keep only the newest this many checkpoints."""
    resume: str = "auto"
    """`auto` (newest valid checkpoint in the run folder, if any), `never`, or a checkpoint path."""


# Bounds [low, high] of numeric keys: a value beyond them is a typo or a unit mistake, not a
# setting (data.prefetch=100000 would queue 100000 decoded batches in memory; an lr of 1e30 or a
# loss weight of 1e9 only makes NaN).
_RANGES: dict[str, tuple[float, float]] = {
    "data.global_batch": (1, 1 << 20), "data.batch_size": (0, 1 << 16),
    "data.load_size": (1, 8192), "data.crop_size": (1, 8192), "data.shuffle_buffer": (1, 1 << 20),
    "data.num_threads": (1, 256), "data.prefetch": (1, 32),
    "model.ngf": (1, 1024), "model.ndf": (1, 1024), "model.num_downs": (5, 12),
    "model.d_layers": (1, 8), "optim.reference_batch": (1, 1 << 20),
    "train.steps": (0, 1 << 40), "train.seed": (0, 2**31 - 1), "train.max_nonfinite": (1, 1 << 40),
    "train.sync_every": (1, 1 << 40),
    "log.every": (1, 1 << 40), "log.sample_every": (1, 1 << 40), "log.sample_count": (1, 256),
    "eval.every": (0, 1 << 40), "eval.count": (1, 1 << 20),
    "ckpt.every": (1, 1 << 40), "ckpt.keep": (1, 1000),
    "data.rrc_min_scale": (0, 1), "data.hw_decoder_load": (0, 1), "optim.lr": (0, 1),
    "optim.lambda_l1": (0, 10_000), "optim.beta1": (0, 0.9999), "optim.beta2": (0, 0.9999999),
    "optim.decay_fraction": (0, 1), "train.epochs": (0, 1_000_000),
    "optim.warmup_lr": (0, 1), "optim.warmup_beta1": (0, 0.9999),
    "train.l1_warmup_epochs": (0, 1_000_000), "train.l1_warmup_steps": (0, 1 << 40),
}
_ABOVE_LOW = {"data.rrc_min_scale", "optim.lr", "train.epochs", "optim.warmup_lr"}  # (low, high]: low excluded


@dataclass
class Config:
    run_dir: str = "runs/pix2pix"
    """Run folder: config.json, stats.jsonl, samples/, checkpoints/, generator.safetensors."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline and the recipe's batch."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Networks."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Losses, optimizers and the learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length and the loop."""
    log: LogConfig = field(default_factory=LogConfig)
    """Tracking."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Inference mode and periodic evaluation."""
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""

    def validate(self) -> "Config":
        """Raise ConfigError naming the first invalid key; return self for chaining.
        (Choices are checked by the types when parsing; the world size and the split's size
        are checked when the recipe is resolved, recipe.py.)"""
        values = dict(leaf_items(self))
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={value} is not a finite number")
        for key, (low, high) in _RANGES.items():
            value, open_low = values[key], key in _ABOVE_LOW
            if not (low < value if open_low else low <= value) or value > high:
                raise ConfigError(f"{key}={value} is out of range: it must be in "
                                  f"{'(' if open_low else '['}{low}, {high}]")
        # An empty path is the current folder to pathlib: never what the user meant.
        for key in ("run_dir", "data.shards", "ckpt.resume", "log.project"):
            if not values[key].strip():
                raise ConfigError(f"{key} is empty; give a value (see --help)")
        m = self.model
        if m.generator != "unet":
            if self.data.crop_size % 32:
                raise ConfigError(f"data.crop_size={self.data.crop_size} must be divisible by 32 "
                                  f"for model.generator={m.generator}")
            if m.norm == "instance":
                raise ConfigError(f"model.norm=instance is the pix2pix U-Net's option; "
                                  f"model.generator={m.generator} uses BatchNorm (its encoder's)")
            if m.encoder_weights not in ("imagenet", "none") and not Path(m.encoder_weights).is_file():
                raise ConfigError(f"model.encoder_weights={m.encoder_weights!r}: no such file "
                                  f"(use imagenet, none or the path of a ResNet state_dict)")
        elif self.data.crop_size % 2 ** m.num_downs:
            raise ConfigError(
                f"data.crop_size={self.data.crop_size} must be divisible by 2**model.num_downs="
                f"{2 ** m.num_downs} (unet_256: num_downs=8 and crop 256; unet_128: num_downs=7 "
                f"and crop 128)")
        if self.data.load_size < self.data.crop_size:
            raise ConfigError(f"data.load_size={self.data.load_size} must be at least "
                              f"data.crop_size={self.data.crop_size}")
        # PatchGAN: d_layers halvings, then two 4x4 stride-1 convolutions that each lose a pixel.
        if self.data.crop_size < 3 * 2 ** self.model.d_layers:
            raise ConfigError(f"model.d_layers={self.model.d_layers} is too deep for "
                              f"data.crop_size={self.data.crop_size} (needs a crop of at least "
                              f"{3 * 2 ** self.model.d_layers})")
        if self.ckpt.resume not in ("auto", "never") and not Path(self.ckpt.resume).exists():
            raise ConfigError(f"ckpt.resume={self.ckpt.resume!r}: no such checkpoint "
                              f"(use 'auto', 'never' or a path under <run_dir>/checkpoints)")
        return self

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON, atomically."""
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
        atomic_write(Path(path), text + "\n")


# Presets: named recipes, each a flat dict of dotted keys over the defaults. Batches are global
# (images per optimizer step, all processes) and run lengths in epochs, so a preset means the
# same run on 1 GPU or 64; optim.reference_batch records the batch its optim.lr belongs to.
PRESETS: dict[str, dict[str, Any]] = {
    # Source: M. Shariatnia, "Colorizing black & white images with U-Net and conditional GAN - A
    # Tutorial" (Towards Data Science, 2020; github.com/moein-shariatnia/Deep-Learning): 10,000
    # images drawn from fastai's COCO sample (8,000 train / 2,000 val), Resize((256, 256),
    # BICUBIC) with no crop, random horizontal flip, batch 16 read in a fixed order (no
    # shuffle), grayscale photos kept, unet_256 + 70x70 PatchGAN with BatchNorm (over the 16),
    # vanilla GAN loss + 100 x L1, Adam 2e-4 (0.5, 0.999) for both nets, constant lr (no
    # scheduler), 100 epochs, fp32, model.eval() for its visualisations. Deviations (README's
    # preset table): the images are the shards you give (`make shards ... LIMIT=10000` draws
    # other ones); shuffled; grayscale photos dropped by the shard writer; bf16 autocast where the
    # device has it (train.mixed_precision=auto: GPUs, CPUs with native bf16; =no: fp32); fused
    # Adam (train.fused_adam=false: plain Adam).
    "tutorial": {
        "data.shards": "shards/coco", "data.global_batch": 16, "data.resize": "square",
        "data.load_size": 256, "data.crop_size": 256, "data.flip": True,
        "optim.lr": 2e-4, "optim.reference_batch": 16, "optim.beta1": 0.5, "optim.beta2": 0.999,
        "optim.decay_fraction": 0.0, "train.epochs": 100.0, "eval.norm_mode": "eval",
        "run_dir": "runs/tutorial",
    },
    # Source: the same tutorial's final model (section "A new strategy"): fastai
    # `create_body(resnet18, pretrained=True, n_in=1, cut=-2)` + `DynamicUnet(body, 2, (256, 256))`,
    # the generator pretrained alone for 20 epochs with L1 (Adam lr 1e-4, default betas), then the
    # GAN for 20 epochs (Adam 2e-4 (0.5, 0.999), the same PatchGAN and losses), constant lr, batch
    # 16, the 256x256 squash with flips. Deviations: our decoder is smp-style, not fastai's
    # DynamicUnet (docs/design.md, "The ResNet-encoder generator": nearest-neighbour upsampling,
    # no middle block or final input cross, a tanh output; 14.3M parameters); bf16 autocast on
    # GPUs as in `tutorial`.
    "tutorial-resnet": {
        "data.shards": "shards/coco", "data.global_batch": 16, "data.resize": "square",
        "data.load_size": 256, "data.crop_size": 256, "data.flip": True,
        "model.generator": "resnet18-unet", "model.encoder_weights": "imagenet",
        "train.l1_warmup_epochs": 20.0, "optim.warmup_lr": 1e-4, "optim.warmup_beta1": 0.9,
        "optim.lr": 2e-4, "optim.reference_batch": 16, "optim.beta1": 0.5, "optim.beta2": 0.999,
        "optim.decay_fraction": 0.0, "train.epochs": 20.0, "eval.norm_mode": "eval",
        "run_dir": "runs/tutorial-resnet",
    },
    # Source: Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks"
    # (CVPR 2017) and its reference code (junyanz/pytorch-CycleGAN-and-pix2pix, options/
    # base_options.py and train_options.py, data/base_dataset.py): `resize_and_crop`, i.e.
    # Resize([286, 286], BICUBIC) (a square squash) + RandomCrop(256), flip, batch 1, Adam 2e-4
    # (0.5, 0.999), lambda_L1 100, n_epochs 100 at constant lr + n_epochs_decay 100 decaying
    # linearly, fp32, and test-time BatchNorm on batch statistics with dropout (no --eval).
    # Deviations (README's preset table): the lr decays per step and reaches exactly 0 (the
    # reference: per epoch, ending at 1/101); the test view takes the centre crop (the
    # reference's test crop is random); shards are shuffled and grayscale photos dropped.
    "paper": {
        "data.global_batch": 1, "data.resize": "square", "data.load_size": 286,
        "data.crop_size": 256, "data.flip": True, "optim.lr": 2e-4, "optim.reference_batch": 1,
        "optim.lambda_l1": 100.0, "optim.decay_fraction": 0.5, "train.epochs": 200.0,
        "train.mixed_precision": "no", "eval.norm_mode": "batch", "log.every": 200,
        "log.sample_every": 5000, "ckpt.every": 10_000, "run_dir": "runs/paper",
    },
    # Ours (no external source): a throughput recipe for full COCO train2017 (`make shards
    # SOURCE=.../train2017.zip RESIZE=286`): global batch 512 (64 per GPU on 8 GPUs), compiled,
    # aspect-preserving geometry (shorter side 286 + crop 256), pix2pix's schedule, the
    # tutorial's lr kept unscaled as large-batch GANs usually are. BatchNorm per process
    # (`batch_local`, 64 images per GPU on 8): a stated choice, no per-layer communication.
    # Untuned: a starting point for throughput work, not a quality claim.
    "coco": {
        "data.shards": "shards/train2017", "data.global_batch": 512, "optim.lr": 2e-4,
        "optim.reference_batch": 512, "model.norm": "batch_local", "train.epochs": 100.0,
        "train.compile": True,
        "log.every": 100, "log.sample_every": 2000, "ckpt.every": 5000, "run_dir": "runs/coco",
    },
    # Ours: what `make train` runs without a GPU: unet_128 on the bundled sample shards (9 train
    # photos: 2 steps of 4 per epoch), 400 steps, about 1.5 minutes on 2 cores.
    "cpu-demo": {
        "data.shards": "shards/sample", "data.global_batch": 4, "data.load_size": 143,
        "data.crop_size": 128, "data.num_threads": 2, "data.shuffle_buffer": 64,
        "model.num_downs": 7, "model.ngf": 32, "model.ndf": 32, "optim.reference_batch": 4,
        "train.epochs": 200.0, "train.mixed_precision": "no", "log.every": 20,
        "log.sample_every": 100, "log.sample_count": 4, "eval.every": 200, "eval.count": 8,
        "ckpt.every": 100, "ckpt.keep": 2, "run_dir": "runs/demo",
    },
    # Ours: what `make train` runs on GPUs: full unet_256 on the sample shards, on every GPU. No
    # global batch divides every count from 1 to 9 GPUs, so this demo pins the per-process batch
    # (1, the paper's; global = number of GPUs, at most the 9 training photos) and the steps.
    "gpu-demo": {
        "data.shards": "shards/sample", "data.batch_size": 1, "data.shuffle_buffer": 64,
        "optim.reference_batch": 1, "train.steps": 1000, "log.every": 20,
        "log.sample_every": 200, "log.sample_count": 4, "eval.norm_mode": "batch",
        "eval.every": 500, "eval.count": 8, "ckpt.every": 250, "ckpt.keep": 2, "run_dir": "runs/demo",
    },
}


def leaf_items(tree: Config | dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a config, or of a nested dict like config.json."""
    if isinstance(tree, Config):
        tree = dataclasses.asdict(tree)
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaf_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key from a typed value (a preset or a JSON file): checked, not converted."""
    *parents, name = key.split(".")
    parent = functools.reduce(lambda obj, part: getattr(obj, part, None), parents, cfg)
    hints = typing.get_type_hints(type(parent)) if dataclasses.is_dataclass(parent) else {}
    typ = hints.get(name)
    if typ is None or dataclasses.is_dataclass(typ):
        raise ConfigError(f"unknown config key {key!r} (see --help for the list)")
    if key == "model.norm" and isinstance(value, str):  # an old config.json: a renamed choice
        value = RENAMED_NORMS.get(value, value)
    if typing.get_origin(typ) is Literal:
        ok = value in typing.get_args(typ)
        expected = " or ".join(repr(choice) for choice in typing.get_args(typ))
    elif typ == bool | None:  # AutoBoolValue: "auto" (or JSON null) means the device's default
        value = None if value == "auto" else value
        ok, expected = value is None or isinstance(value, bool), "true, false or 'auto'"
    else:  # bool is an int subclass, but true is not a number here, nor 1 a boolean
        ok = (isinstance(value, (int, float) if typ is float else typ)
              and (typ is bool or not isinstance(value, bool)))
        expected = typ.__name__
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    setattr(parent, name, float(value) if typ is float else value)


def build_config(preset: str | None = None, config_file: str | None = None,
                 overrides: typing.Iterable[tuple[str, Any]] = ()) -> Config:
    """Defaults, then a preset, then a JSON config file, then typed dotted overrides; validated.
    (The command line goes through `parse_command`, which starts from the same first steps.)"""
    cfg = _base_config(preset, config_file)
    for key, value in overrides:
        set_key(cfg, key, value)
    return cfg.validate()


def _base_config(preset: str | None, config_file: str | None) -> Config:
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            set_key(cfg, key, value)
    if config_file is not None:
        try:
            data = json.loads(read_text(config_file))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"cannot read config file {config_file}: {reason}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {config_file} must hold a JSON object like config.json")
        for key, value in leaf_items(data):
            set_key(cfg, key, value)
    return cfg


@dataclass
class TrainCommand(Config):
    """The command line of train.py: every Config key, plus what picks the starting values."""

    # The metavars keep tyro from listing None as a choice: the options are optional, not None.
    preset: Annotated[Literal[tuple(PRESETS)] | None,  # type: ignore[valid-type]
                      tyro.conf.arg(metavar="{" + ",".join(PRESETS) + "}")] = None
    """Named recipe applied over the defaults (see the README's preset table)."""
    config: Annotated[str | None, tyro.conf.arg(metavar="FILE.json")] = None
    """JSON file holding an object like a run's config.json, applied after the preset."""
    dry_run: FlagValue = False
    """Print the resolved recipe for this world size (WORLD_SIZE, else 1) and exit, counting the
    train split but building nothing."""


# Short forms users reach for first.
ALIASES = {"resume": "ckpt.resume", "shards": "data.shards", "steps": "train.steps"}

# tyro keeps the description's paragraphs (blank-line separated) and joins their lines.
DESCRIPTION = "\n\n".join([
    "Train pix2pix colorization: accelerate launch train.py [--preset NAME] "
    "[--config FILE.json] [key=value | --key value ...]",
    "Settings apply in order: defaults, preset, config file, then overrides.",
    "A recipe is global: data.global_batch images per optimizer step over all processes, "
    "train.epochs passes over the train split. The per-process batch and the step count follow "
    "from the number of processes (pin them with data.batch_size and train.steps).",
    "Short forms: " + ", ".join(f"--{short} ({key})" for short, key in ALIASES.items()) + ".",
])


def parse_command(argv: list[str]) -> tuple[Config, bool]:
    """(validated Config, dry_run) from train.py's arguments; `--help` prints and exits 0."""
    # The preset and the file must be known before parsing: they supply the defaults that the
    # other arguments override (and that --help shows).
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    first.add_argument("--preset")
    first.add_argument("--config")
    try:
        start = first.parse_known_args(expand_key_values(argv, ALIASES))[0]
        default = TrainCommand(**vars(_base_config(start.preset, start.config)),
                               preset=start.preset, config=start.config)
        command = parse(TrainCommand, argv, prog="train.py", description=DESCRIPTION,
                        default=default, aliases=ALIASES)
    except argparse.ArgumentError as exc:
        raise ConfigError(str(exc)) from None
    cfg = Config(**{f.name: getattr(command, f.name) for f in dataclasses.fields(Config)})
    return cfg.validate(), command.dry_run
