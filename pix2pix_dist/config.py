"""Typed run configuration: dataclasses with a docstring per field, presets, CLI overrides.

A run is described by one `Config`. It is built from a preset, then overridden from the command
line with dotted keys (`data.batch_size=32` or `--data.batch_size 32`), then validated: every
problem is reported in one line naming the key. The resolved config is saved as `config.json`
in the run folder and sent to the tracker, so a run can always be reproduced from its folder.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


@dataclass
class DataConfig:
    shards: str = "shards/coco"
    """Folder written by `make shards` (holds manifest.json and {train,val}-NNNNNN.tar)."""
    backend: str = "auto"
    """Input pipeline: `dali` (GPU decode), `torch` (webdataset + DataLoader), or `auto`
    (DALI where it is installed, else torch with a one-line notice)."""
    batch_size: int = 16
    """Images per process per step (the global batch is this times the number of processes)."""
    load_size: int = 286
    """Training images are resized so that their shorter side is this (pix2pix: 286)."""
    crop_size: int = 256
    """Square training crop (pix2pix: 256); must be divisible by 2**model.num_downs."""
    random_resized_crop: bool = False
    """Use a random-resized crop (scale `rrc_min_scale`..1) instead of resize + random crop."""
    rrc_min_scale: float = 0.35
    """Smallest area fraction kept by the random-resized crop."""
    flip: bool = True
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
    ngf: int = 64
    """Generator filters in the first layer (pix2pix: 64)."""
    num_downs: int = 8
    """Generator stride-2 downsamplings: 8 is unet_256, 7 is unet_128."""
    ndf: int = 64
    """Discriminator filters in the first layer (pix2pix: 64)."""
    d_layers: int = 3
    """Discriminator stride-2 layers: 3 gives the 70x70 PatchGAN."""
    norm: str = "batch"
    """Normalisation: `batch`, `instance` or `syncbatch` (BatchNorm synchronised across processes)."""
    dropout: bool = True
    """Dropout 0.5 in the three innermost 512-channel generator blocks (pix2pix's noise)."""


@dataclass
class OptimConfig:
    gan_mode: str = "vanilla"
    """GAN loss: `vanilla` (BCE with logits), `lsgan` or `hinge`."""
    lambda_l1: float = 100.0
    """Weight of the L1 loss on ab against the GAN loss."""
    lr: float = 2e-4
    """Adam learning rate for both networks."""
    beta1: float = 0.5
    """Adam beta1 (pix2pix: 0.5)."""
    beta2: float = 0.999
    """Adam beta2."""
    decay_steps: int = -1
    """Final steps over which the learning rate decays linearly to zero; -1 means half the run."""


@dataclass
class TrainConfig:
    steps: int = 50_000
    """Optimizer steps in the whole run (the schedule and the stopping point)."""
    mixed_precision: str = "bf16"
    """`bf16`, `fp16` or `no`. On a machine without a GPU it falls back to `no` with a notice."""
    channels_last: bool = True
    """Use channels_last memory format on CUDA (faster convolutions)."""
    compile: bool = False
    """Wrap both networks in torch.compile (slow first steps, faster afterwards)."""
    seed: int = 0
    """Seed for weights, augmentation and shuffling."""
    deterministic: bool = False
    """Deterministic algorithms, and data epochs that depend only on (seed, epoch), so a resumed
    run ends with the same weights as an uninterrupted one (slower; for debugging and tests)."""
    max_nonfinite: int = 50
    """Stop the run with an error after this many steps with a non-finite loss (each is skipped)."""


@dataclass
class LogConfig:
    tracker: str = "wandb"
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
class CheckpointConfig:
    every: int = 1000
    """Save a full training-state checkpoint every this many steps (and at the end)."""
    keep: int = 3
    """Keep only the newest this many checkpoints."""
    resume: str = "auto"
    """`auto` (newest valid checkpoint in the run folder, if any), `never`, or a checkpoint path."""


@dataclass
class Config:
    run_dir: str = "runs/pix2pix"
    """Run folder: config.json, stats.jsonl, samples/, checkpoints/, generator.safetensors."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Networks."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Losses and optimizers."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop."""
    log: LogConfig = field(default_factory=LogConfig)
    """Tracking."""
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""

    def validate(self) -> "Config":
        """Raise ConfigError naming the first invalid key; return self for chaining."""
        _check_choice("data.backend", self.data.backend, ("auto", "dali", "torch"))
        _check_choice("model.norm", self.model.norm, ("batch", "instance", "syncbatch"))
        _check_choice("optim.gan_mode", self.optim.gan_mode, ("vanilla", "lsgan", "hinge"))
        _check_choice("train.mixed_precision", self.train.mixed_precision, ("bf16", "fp16", "no"))
        _check_choice("log.tracker", self.log.tracker, ("wandb", "tensorboard", "none"))
        for key in ("data.batch_size", "data.load_size", "data.crop_size", "data.num_threads",
                    "data.shuffle_buffer", "data.prefetch", "model.ngf", "model.ndf",
                    "model.num_downs", "model.d_layers", "train.steps", "train.max_nonfinite",
                    "log.every", "log.sample_every", "log.sample_count", "ckpt.every", "ckpt.keep"):
            if get_key(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {get_key(self, key)}")
        if self.model.num_downs < 5:
            raise ConfigError(f"model.num_downs must be at least 5 (the U-Net has 5 fixed-width "
                              f"outer levels), got {self.model.num_downs}")
        step = 2 ** self.model.num_downs
        if self.data.crop_size % step:
            raise ConfigError(
                f"data.crop_size={self.data.crop_size} must be divisible by 2**model.num_downs="
                f"{step} (unet_256: num_downs=8 and crop 256; unet_128: num_downs=7 and crop 128)")
        if self.data.load_size < self.data.crop_size:
            raise ConfigError(f"data.load_size={self.data.load_size} must be at least "
                              f"data.crop_size={self.data.crop_size}")
        if not 0.0 < self.data.rrc_min_scale <= 1.0:
            raise ConfigError(f"data.rrc_min_scale must be in (0, 1], got {self.data.rrc_min_scale}")
        if not 0.0 <= self.data.hw_decoder_load <= 1.0:
            raise ConfigError(f"data.hw_decoder_load must be in [0, 1], got {self.data.hw_decoder_load}")
        if self.optim.lr <= 0 or self.optim.lambda_l1 < 0:
            raise ConfigError("optim.lr must be positive and optim.lambda_l1 non-negative")
        if not (0 <= self.optim.beta1 < 1 and 0 <= self.optim.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")
        if self.optim.decay_steps > self.train.steps:
            raise ConfigError(f"optim.decay_steps={self.optim.decay_steps} exceeds "
                              f"train.steps={self.train.steps}")
        if self.ckpt.resume not in ("auto", "never") and not Path(self.ckpt.resume).exists():
            raise ConfigError(f"ckpt.resume={self.ckpt.resume!r}: no such checkpoint "
                              f"(use 'auto', 'never' or a path under <run_dir>/checkpoints)")
        return self

    @property
    def decay_steps(self) -> int:
        """Steps of linear learning-rate decay at the end of the run."""
        return self.train.steps // 2 if self.optim.decay_steps < 0 else self.optim.decay_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON, atomically."""
        from .atomic import atomic_write

        atomic_write(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")


# Presets: named starting points. Each is a flat dict of dotted overrides on the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # Isola et al. 2017: batch 1, 286 -> 256 random crop, flip; ~200 epochs of a small set.
    "paper": {
        "data.batch_size": 1, "data.load_size": 286, "data.crop_size": 256,
        "train.steps": 400_000, "train.mixed_precision": "no", "log.every": 200,
        "log.sample_every": 5000, "ckpt.every": 10_000, "run_dir": "runs/paper",
    },
    # The well-known COCO colorization tutorial: 10k COCO images (8k train), 256x256 resize,
    # flip, batch 16, 100 epochs = 50k steps.
    "tutorial": {
        "data.shards": "shards/coco", "data.batch_size": 16, "data.load_size": 256,
        "data.crop_size": 256, "train.steps": 50_000, "run_dir": "runs/tutorial",
    },
    # Throughput-oriented COCO training on many GPUs (per-process batch; scale lr yourself).
    "coco": {
        "data.shards": "shards/coco", "data.batch_size": 64, "train.steps": 100_000,
        "train.compile": True, "log.every": 100, "log.sample_every": 2000,
        "ckpt.every": 5000, "run_dir": "runs/coco",
    },
    # `make train` on a machine without a GPU: unet_128 on the bundled sample shards, < 5 minutes.
    "cpu-demo": {
        "data.shards": "shards/sample", "data.batch_size": 4, "data.load_size": 143,
        "data.crop_size": 128, "data.num_threads": 2, "data.shuffle_buffer": 64,
        "model.num_downs": 7, "model.ngf": 32, "model.ndf": 32, "train.steps": 400,
        "train.mixed_precision": "no", "log.every": 20, "log.sample_every": 100,
        "log.sample_count": 4, "ckpt.every": 100, "ckpt.keep": 2, "run_dir": "runs/demo",
    },
    # `make train` on GPUs: full unet_256 on the sample shards, every GPU, a few minutes.
    # Batch 1 per GPU (the paper's batch) so that up to 9 GPUs share the 9 training photos.
    "gpu-demo": {
        "data.shards": "shards/sample", "data.batch_size": 1, "data.shuffle_buffer": 64,
        "train.steps": 1000, "log.every": 20, "log.sample_every": 200, "log.sample_count": 4,
        "ckpt.every": 250, "ckpt.keep": 2, "run_dir": "runs/demo",
    },
}


def get_key(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def set_key(cfg: Config, key: str, raw: Any) -> None:
    """Set a dotted key, converting a string to the field's declared type."""
    *parents, name = key.split(".")
    obj: Any = cfg
    for part in parents:
        if not dataclasses.is_dataclass(obj) or part not in _field_types(obj):
            raise ConfigError(f"unknown config key {key!r} (see --help for the list)")
        obj = getattr(obj, part)
    types_ = _field_types(obj) if dataclasses.is_dataclass(obj) else {}
    if name not in types_ or dataclasses.is_dataclass(getattr(obj, name)):
        raise ConfigError(f"unknown config key {key!r} (see --help for the list)")
    setattr(obj, name, _convert(key, raw, types_[name]))


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _convert(key: str, raw: Any, typ: Any) -> Any:
    if not isinstance(raw, str):  # from a JSON config file or a preset: check, don't coerce
        ok = (isinstance(raw, bool) if typ is bool else
              isinstance(raw, int) and not isinstance(raw, bool) if typ is int else
              isinstance(raw, (int, float)) and not isinstance(raw, bool) if typ is float else
              False)
        if not ok:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {raw!r}")
        return float(raw) if typ is float else raw
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw.replace("_", ""))
        if typ is float:
            return float(raw)
        if typ is str or isinstance(typ, types.UnionType):
            return raw
    except ValueError:
        raise ConfigError(f"{key}: cannot read {raw!r} as {typ.__name__}") from None
    return raw


def iter_fields(cfg: Any = None, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """Yield (dotted key, default value, docstring) for every leaf field, for --help."""
    import ast
    import inspect

    cfg = Config() if cfg is None else cfg
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(type(cfg)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, docs.get(f.name, "")


HELP_HEADER = """\
usage: accelerate launch train.py [--preset NAME] [--config FILE.json] [KEY=VALUE | --KEY VALUE ...]

Train pix2pix colorization. Settings are applied in order: defaults, preset, config file,
then overrides. Presets: {presets}.
Short forms: --resume (ckpt.resume), --shards (data.shards), --steps (train.steps).

Keys:
"""


def help_text() -> str:
    lines = [HELP_HEADER.format(presets=", ".join(PRESETS))]
    for key, default, doc in iter_fields():
        lines.append(f"  {key} = {default!r}\n      {doc}")
    return "\n".join(lines)


# Short forms users reach for first.
ALIASES = {"resume": "ckpt.resume", "shards": "data.shards", "steps": "train.steps"}


def parse_args(argv: list[str]) -> Config:
    """Build a validated Config from command-line arguments (see `help_text`)."""
    preset: str | None = None
    config_file: str | None = None
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{arg} needs a value")
                arg = f"{arg}={argv[i + 1]}"
                i += 1
        if "=" not in arg:
            raise ConfigError(f"cannot read argument {argv[i]!r}: use KEY=VALUE or --KEY VALUE")
        key, value = arg.split("=", 1)
        key = ALIASES.get(key, key.replace("-", "_"))
        if key == "preset":
            preset = value
        elif key == "config":
            config_file = value
        else:
            overrides.append((key, value))
        i += 1
    return build_config(preset, config_file, overrides)


def build_config(preset: str | None = None, config_file: str | None = None,
                 overrides: typing.Iterable[tuple[str, Any]] = ()) -> Config:
    """Defaults, then a preset, then a JSON config file, then dotted overrides; validated."""
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            set_key(cfg, key, value)
    if config_file is not None:
        try:
            data = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {config_file} must hold a JSON object like config.json")
        for key, value in _flatten(data):
            set_key(cfg, key, value)
    for key, value in overrides:
        set_key(cfg, key, value)
    return cfg.validate()


def _flatten(data: dict[str, Any], prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
