"""Evaluation as a library: metrics of a generator and of the gray baseline over samples,
gathered over processes, and the training loop's periodic evaluation (CLI: evaluate.py)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data.geometry import decode
from .data.lab import lab_to_rgb, uint8_to_lab
from .data.reading import read_range
from .data.shards_index import ShardSet
from .errors import warn
from .export import InferenceSettings, NormMode
from .imageio import display_name, first_line
from .inference import (GeometryError, compose, image_seed, inference_copy, model_input,
                        model_shape, predict_ab, training_view)
from .metrics import fid_features, frechet_distance, image_metrics, mean_metrics
from .ranks import all_gather

NOT_COMPUTED = "not computed (no local weights)"
EXTREMES = 4
"""Best and worst images by ab-L1 shown in the best/worst gallery."""


@dataclass
class ImageResult:
    index: int
    """Position in the split (shards in order), which is what makes gathering exact."""
    key: str
    model: dict[str, float]
    gray: dict[str, float]
    full_model: dict[str, float] | None = None
    full_gray: dict[str, float] | None = None


@dataclass
class Tiles:
    """Training-resolution uint8 (3,S,S) images of one sample, for the galleries."""
    key: str
    gray: torch.Tensor
    pred: torch.Tensor
    truth: torch.Tensor


@dataclass
class Evaluation:
    results: list[ImageResult]
    skipped: dict[str, int]
    tiles: dict[int, Tiles] = field(default_factory=dict)
    features: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    """FID features by rendering ("pred", "gray", "truth") and position, when computed."""


def read_split(shards: ShardSet, start: int, stop: int) -> Iterator[tuple[int, str, torch.Tensor | str]]:
    """(position, "shard/key", uint8 (3,H,W) RGB or the reason it cannot be decoded) for the
    samples at positions [start, stop) of the split, decoded like the torch input pipeline."""
    for index, (shard, key, jpg) in enumerate(read_range(shards, start, stop), start):
        name = f"{shard}/{key}"
        if jpg is None:
            yield index, name, "no .jpg member"
            continue
        try:
            yield index, name, decode(torch.frombuffer(bytearray(jpg), dtype=torch.uint8))
        except RuntimeError as exc:
            yield index, name, first_line(exc)


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy()


def _to_uint8(rgb01: torch.Tensor) -> torch.Tensor:
    return rgb01.mul(255).round_().to(torch.uint8)


def _neutral(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) rendered with ab = 0 -> exactly R = G = B (the Lab round trip's float error
    would otherwise give the gray baseline a colourfulness of ~0.1 instead of 0)."""
    return rgb[..., 1:2, :, :].expand_as(rgb)


def evaluate_samples(generator: torch.nn.Module, settings: InferenceSettings, mode: NormMode,
                     samples: Iterator[tuple[int, str, torch.Tensor | str]], *,
                     device: torch.device, batch_size: int = 16, full_res: bool = False,
                     keep_tiles: int = 0, fid_net: torch.nn.Module | None = None,
                     lpips_net: torch.nn.Module | None = None) -> Evaluation:
    """Metrics of the model and of the gray baseline for each decodable sample.

    Tiles are kept for the first `keep_tiles` samples and the EXTREMES best and worst by ab-L1,
    so memory stays bounded however many images there are."""
    out = Evaluation([], {})

    def skip(reason: str, key: str, detail: object) -> None:
        out.skipped[reason] = out.skipped.get(reason, 0) + 1
        warn(f"skipped {display_name(key)}: {detail}")

    def measurable() -> Iterator[tuple[int, str, torch.Tensor]]:
        for index, key, rgb in samples:
            if isinstance(rgb, str):
                skip("undecodable", key, rgb)
                continue
            if full_res:
                try:
                    model_shape(rgb.shape[-2], rgb.shape[-1], settings, 2 ** generator.num_downs)
                except GeometryError as exc:
                    skip("too_thin", key, exc)
                    continue
            yield index, key, rgb

    usable = measurable()
    while batch := list(itertools.islice(usable, batch_size)):
        views = torch.stack([training_view(rgb, settings) for _, _, rgb in batch]).to(device)
        L, _ = uint8_to_lab(views)
        ab = predict_ab(generator, L, mode, [image_seed(key) for _, key, _ in batch])
        preds = _to_uint8(lab_to_rgb(L, ab)).cpu()
        grays = _neutral(_to_uint8(lab_to_rgb(L, torch.zeros_like(ab))).cpu())
        if fid_net is not None:
            for name, images in (("pred", preds), ("gray", grays), ("truth", views)):
                feats = fid_features(fid_net, images.to(device))
                out.features.setdefault(name, {}).update(
                    {index: f for (index, _, _), f in zip(batch, feats)})
        if lpips_net is not None:
            lp_model = lpips_net(preds.to(device), views).tolist()
            lp_gray = lpips_net(grays.to(device), views).tolist()
        views = views.cpu()
        for (index, key, rgb), pred, gray, truth in zip(batch, preds, grays, views):
            p, g, t = map(hwc, (pred, gray, truth))
            result = ImageResult(index, key, image_metrics(p, t), image_metrics(g, t))
            if lpips_net is not None:
                result.model["lpips"], result.gray["lpips"] = lp_model.pop(0), lp_gray.pop(0)
            if full_res:
                full, t_full = rgb.to(device), hwc(rgb)
                L_full, h, w = model_input(full, settings, 2 ** generator.num_downs)
                ab_full = predict_ab(generator, L_full, mode, [image_seed(key)])[0, :, :h, :w]
                pred_full = compose(full, ab_full)
                gray_full = _neutral(compose(full, torch.zeros(2, 1, 1, device=device)))
                result.full_model = image_metrics(hwc(pred_full), t_full)
                result.full_gray = image_metrics(hwc(gray_full), t_full)
            out.results.append(result)
            out.tiles[index] = Tiles(key, gray, pred, truth)
        _prune_tiles(out, keep_tiles)
    return out


def _prune_tiles(out: Evaluation, first: int) -> None:
    keep = set(sorted(out.tiles)[:first])
    keep |= {r.index for r in extremes([r for r in out.results if r.index in out.tiles])}
    for index in set(out.tiles) - keep:
        del out.tiles[index]


def gather(part: Evaluation, expected: int) -> Evaluation:
    """All ranks' results on every rank, ordered by position; each position exactly once.

    Ranks read disjoint position ranges (sampling.rank_range), so nothing is padded; a position
    seen twice or a count that does not add up is a bug and raises."""
    parts = all_gather(part)
    results = sorted((r for p in parts for r in p.results), key=lambda r: r.index)
    skipped = sum((Counter(p.skipped) for p in parts), Counter())
    merged = Evaluation(results, dict(skipped))
    for p in parts:
        merged.tiles.update(p.tiles)
        for name, feats in p.features.items():
            merged.features.setdefault(name, {}).update(feats)
    unique = {r.index for r in results}
    if len(unique) != len(results) or len(results) + skipped.total() != expected:
        raise RuntimeError(f"gathered {len(results)} results ({len(unique)} distinct) and "
                           f"{skipped.total()} skips for {expected} samples")
    return merged


def summary(results: list[ImageResult]) -> dict[str, dict[str, dict[str, float]]]:
    """{"train_res": {"model": means, "gray": means}, "full_res": ... (when measured)}."""
    out = {"train_res": {"model": mean_metrics([r.model for r in results]),
                         "gray": mean_metrics([r.gray for r in results])}}
    if results and results[0].full_model is not None:
        out["full_res"] = {"model": mean_metrics([r.full_model for r in results]),  # type: ignore[misc]
                           "gray": mean_metrics([r.full_gray for r in results])}  # type: ignore[misc]
    return out


def lpips_report(results: list[ImageResult]) -> dict[str, float] | str:
    """Mean LPIPS of the model and of the gray baseline against the truth (training resolution)."""
    if not results or "lpips" not in results[0].model:
        return NOT_COMPUTED
    return {row: float(np.mean([getattr(r, row)["lpips"] for r in results])) for row in ("model", "gray")}


def fid_report(merged: Evaluation) -> dict[str, float] | str:
    """FID of the model and of the gray baseline against the truth, at training resolution."""
    if not merged.features:
        return NOT_COMPUTED
    if len(merged.results) < 2:
        return "not computed (fewer than 2 images)"
    sets = {name: np.stack([feats[i] for i in sorted(feats)]) for name, feats in merged.features.items()}
    return {"model": frechet_distance(sets["pred"], sets["truth"]),
            "gray": frechet_distance(sets["gray"], sets["truth"])}


def extremes(results: list[ImageResult]) -> list[ImageResult]:
    """The EXTREMES best then the EXTREMES worst by ab-L1 (each once), best first."""
    ranked = sorted(results, key=lambda r: r.model["ab_l1"])
    return ranked[:EXTREMES] + [r for r in ranked[-EXTREMES:] if r not in ranked[:EXTREMES]]


class TrainingEval:
    """The training loop's periodic evaluation on the first `count` images of `shards` (its
    eval split: Splits.for_eval), held decoded in memory (main process only). `meta` is what an
    export of the run records (export.generator_meta): the architecture and inference rules."""

    def __init__(self, shards: ShardSet, count: int, meta: dict[str, dict[str, Any]],
                 device: torch.device) -> None:
        samples = read_split(shards, 0, min(count, shards.total))
        self.samples = [s for s in samples if not isinstance(s[2], str)]
        self.model, self.settings = meta["model"], InferenceSettings(**meta["inference"])
        self.device = device

    def __call__(self, generator: torch.nn.Module) -> dict[str, float]:
        """eval/* scalars of `generator` (the training model is not modified)."""
        copy = inference_copy(generator, self.model)
        result = evaluate_samples(copy, self.settings, self.settings.norm_mode, iter(self.samples),
                                  device=self.device)
        means = summary(result.results)["train_res"]
        return {**{f"eval/{k}": v for k, v in means["model"].items()},
                **{f"eval/gray_{k}": means["gray"][k] for k in ("psnr", "ssim", "ab_l1")}}
