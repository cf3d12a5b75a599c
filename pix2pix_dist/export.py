"""Generator exports: the small safetensors file that inference (colorize, evaluate) loads.

An export holds the generator's weights and buffers and two JSON metadata entries:
- `pix2pix_dist.generator`: the architecture (`generator`: `unet`, `resnet18-unet`, ...) and its
  constructor arguments (generators.generator_args; exports without `generator` are `unet`);
- `pix2pix_dist.inference`: how the recipe expects inference to run (`InferenceSettings`:
  BatchNorm/dropout mode, resize rule, crop size) and the training step it was taken at.
Exports written before the second entry existed load with its defaults.

Loading validates everything before building anything large (see docs/design.md, "Evaluation
and inference"): metadata types and ranges, tensor names and shapes against the architecture,
and finite values. Every problem is one ExportError line naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from .atomic import atomic_write
from .config import RENAMED_NORMS, Config, Norm
from .errors import UserError
from .imageio import first_line
from .generators import GENERATORS, build_generator, generator_args
from .resnet_unet import ResNetUNet

EXPORT_NAME = "generator.safetensors"
"""The export's file name in a run folder and in each checkpoint folder."""
MODEL_KEY = "pix2pix_dist.generator"
INFERENCE_KEY = "pix2pix_dist.inference"

NormMode = Literal["batch", "eval"]
ResizeMode = Literal["shorter_side", "square"]
# Bounds on crafted metadata: a generator this large would not fit any GPU anyway, and an
# unchecked ngf or num_downs would make the constructor allocate without limit.
MAX_NUM_DOWNS, MAX_NGF, MAX_CROP = 10, 256, 4096


class ExportError(UserError):
    """A generator export that cannot be used, reported as one line."""


@dataclass(frozen=True)
class InferenceSettings:
    norm_mode: NormMode = "eval"
    """`eval`: running BatchNorm statistics, no dropout; `batch`: each image's own statistics
    with dropout on (pix2pix's test mode). See config.EvalConfig.norm_mode."""
    resize: ResizeMode = "shorter_side"
    """The training geometry (config.DataConfig.resize) that inference reproduces."""
    crop_size: int = 256
    """The training crop: inference scales the shorter side (or both sides) to this."""
    load_size: int = 0
    """The training resize before the crop (config.DataConfig.load_size): the training-resolution
    view (inference.training_view) resizes to it and takes the centre crop. 0 (exports written
    before it was recorded): the crop size."""
    step: int = 0
    """Training step at which the export was written (0 when unknown)."""


@dataclass
class GeneratorExport:
    generator: nn.Module
    """UNetGenerator or ResNetUNet, on the requested device, in eval mode (inference.predict_ab
    switches it as needed); `generator.num_downs` gives the multiple its inputs need."""
    settings: InferenceSettings


def generator_meta(cfg: Config, step: int) -> dict[str, dict[str, Any]]:
    """What export_generator records for a run of `cfg` at `step`."""
    settings = InferenceSettings(norm_mode=cfg.eval.norm_mode, resize=cfg.data.resize,
                                 crop_size=cfg.data.crop_size, load_size=cfg.data.load_size,
                                 step=step)
    return {"model": generator_args(cfg.model), "inference": dataclasses.asdict(settings)}


def export_generator(generator: nn.Module, path: Path, meta: dict[str, dict[str, Any]]) -> None:
    """Write weights, buffers and `meta` (from generator_meta) atomically; refuse non-finite
    weights, which would colorize every image into garbage."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    if bad := nonfinite_entries(tensors):
        raise ExportError(f"refusing to export a generator with non-finite values in {bad[0]} to {path}")
    metadata = {MODEL_KEY: json.dumps(meta["model"]), INFERENCE_KEY: json.dumps(meta["inference"])}
    atomic_write(Path(path), _sorted_metadata(save(tensors, metadata=metadata)))


def _sorted_metadata(blob: bytes) -> bytes:
    """`blob` with its metadata entries in name order. safetensors writes them from a Rust
    HashMap, in an order that changes from process to process; sorted, the same weights always
    give the same bytes (a resumed run's export equals an uninterrupted one's, checksums hold).
    Same entries, same length: the header's padding and the tensor offsets do not move."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= size, "re-serialized safetensors header grew"
    return blob[:8] + text.ljust(size) + blob[8 + size:]


def export_path(target: str | Path) -> Path:
    """The export file of `target`: the file itself, or the EXPORT_NAME inside a run folder or a
    checkpoint folder."""
    target = Path(target)
    return target / EXPORT_NAME if target.is_dir() else target


def load_export(path: str | Path, device: str | torch.device = "cpu") -> GeneratorExport:
    """Read and validate an export (a file, or a run or checkpoint folder holding one);
    ExportError (one line) when it cannot be used."""
    path = export_path(path)
    if not path.is_file():
        raise ExportError(f"no generator export at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for malformed files
        raise ExportError(f"{path} is not a safetensors file: {first_line(exc)}") from None
    if MODEL_KEY not in metadata:
        raise ExportError(f"{path} is not a pix2pix_dist generator export (no {MODEL_KEY} metadata)")
    args = _model_args(_json(path, metadata[MODEL_KEY]), path)
    num_downs = args.get("num_downs", ResNetUNet.num_downs)
    raw = _json(path, metadata[INFERENCE_KEY]) if INFERENCE_KEY in metadata else {
        "crop_size": 2 ** num_downs}
    settings = _settings(raw, num_downs, path)

    # The architecture's names and shapes, without allocating (and, for a ResNet encoder,
    # without pretrained weights: the export holds them).
    with torch.device("meta"):
        generator = build_generator(args)
    expected = generator.state_dict()
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ExportError(f"{path} does not match its own model metadata (missing "
                          f"{missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise ExportError(f"{path}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, the "
                              f"model needs {expected[name].dtype} {tuple(expected[name].shape)}")
    if bad := nonfinite_entries(tensors):
        raise ExportError(f"{path} has non-finite values in {bad[0]} (the run diverged); use the "
                          f"generator.safetensors of an earlier checkpoint")
    generator.load_state_dict(tensors, assign=True)  # the loaded tensors become the weights
    return GeneratorExport(generator.to(device).eval(), settings)


def nonfinite_entries(named: dict[str, Any]) -> list[str]:
    """'G.down.0.weight'-style names of the tensors that hold NaN or inf, in state dicts that
    may nest (optimizer states)."""
    bad: list[str] = []
    for name, value in named.items():
        if isinstance(value, dict):
            bad += nonfinite_entries({f"{name}.{key}": item for key, item in value.items()})
        elif (isinstance(value, torch.Tensor) and value.is_floating_point()
              and not bool(torch.isfinite(value).all())):
            bad.append(name)
    return bad


def _json(path: Path, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ExportError(f"{path} has unreadable metadata: {first_line(exc)}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} has malformed metadata (expected a JSON object)")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _model_args(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    kind = raw.get("generator", "unet")  # written before the key existed: a pix2pix U-Net
    if kind not in GENERATORS:
        raise ExportError(f"{path}: invalid model metadata generator={kind!r} (this version "
                          f"knows {', '.join(GENERATORS)})")
    keys = {"in_channels", "out_channels"} | (
        {"num_downs", "ngf", "norm", "dropout"} if kind == "unet" else set())
    if set(raw) - {"generator"} != keys:
        raise ExportError(f"{path}: {kind} model metadata must have exactly the keys "
                          f"{sorted(keys | {'generator'})}, got {sorted(map(str, raw))}")
    checks = {
        "in_channels": raw["in_channels"] == 1 and _is_int(raw["in_channels"]),
        "out_channels": raw["out_channels"] == 2 and _is_int(raw["out_channels"]),
    }
    if kind == "unet":
        checks.update({
            "num_downs": _is_int(raw["num_downs"]) and 5 <= raw["num_downs"] <= MAX_NUM_DOWNS,
            "ngf": _is_int(raw["ngf"]) and 1 <= raw["ngf"] <= MAX_NGF,
            "norm": isinstance(raw["norm"], str) and (raw["norm"] in get_args(Norm)
                                                      or raw["norm"] in RENAMED_NORMS),
            "dropout": isinstance(raw["dropout"], bool),
        })
    _check(path, "model", checks, raw)
    if kind == "unet":
        return dict(raw, norm=RENAMED_NORMS.get(raw["norm"], raw["norm"]))
    return dict(raw)


def _settings(raw: dict[str, Any], num_downs: int, path: Path) -> InferenceSettings:
    known = {f.name for f in dataclasses.fields(InferenceSettings)}
    if not set(raw) <= known:
        raise ExportError(f"{path}: unknown inference metadata {sorted(set(map(str, raw)) - known)}")
    settings = InferenceSettings(**raw)
    step = 2 ** num_downs
    checks = {
        "norm_mode": settings.norm_mode in get_args(NormMode),
        "resize": settings.resize in get_args(ResizeMode),
        "crop_size": (_is_int(settings.crop_size) and step <= settings.crop_size <= MAX_CROP
                      and settings.crop_size % step == 0),
        "load_size": (_is_int(settings.load_size) and (settings.load_size == 0 or (
            _is_int(settings.crop_size) and settings.crop_size <= settings.load_size <= MAX_CROP))),
        "step": _is_int(settings.step) and settings.step >= 0,
    }
    _check(path, "inference", checks, vars(settings))
    return settings


def _check(path: Path, what: str, checks: dict[str, bool], values: dict[str, Any]) -> None:
    """ExportError naming the first failed check of `checks` (key -> passed) and its value."""
    for key, ok in checks.items():
        if not ok:
            raise ExportError(f"{path}: invalid {what} metadata {key}={values[key]!r}")

