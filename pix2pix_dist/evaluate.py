"""Evaluate a generator on a shard split: metrics per image and averaged, against a gray baseline.

    python -m pix2pix_dist.evaluate runs/demo                       # its config's shards, split val
    accelerate launch -m pix2pix_dist.evaluate runs/coco --full-res  # every process takes a share

Writes <run>/eval/<name>.json (every number, per image too), <name>.md (the tables),
<name>-gallery.png (gray | prediction | truth) and <name>-best-worst.png (best and worst 4 by
ab-L1), and prints the tables. Metric definitions and references are in pix2pix_dist/metrics.py;
the inference rules in pix2pix_dist/inference.py; the design in docs/design.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import tyro
from PIL import Image, ImageDraw

from .atomic import atomic_write
from .cli import CliError, parse
from .config import Config
from .data import DataError
from .data.lab import lab_to_rgb, uint8_to_lab
from .data.sampling import rank_range
from .data.geometry import decode
from .data.reading import read_range
from .data.shards_index import ShardSet, find_shards
from .export import (ExportError, InferenceSettings, NormMode, export_path, generator_meta,
                     load_export)
from .imageio import display_name, first_line
from .inference import (GeometryError, compose, image_seed, inference_copy, model_input,
                        model_shape, predict_ab, training_view)
from .metrics import (METRICS, fid_features, fid_network, frechet_distance, image_metrics,
                      lpips_network, mean_metrics)

NOT_COMPUTED = "not computed (no local weights)"
EXTREMES = 4
"""Best and worst images by ab-L1 shown in the best/worst gallery."""


@dataclass
class EvalOptions:
    target: tyro.conf.Positional[Path]
    """A run folder (its generator.safetensors and config.json) or a generator export file."""
    shards: Path | None = None
    """Shard folder; default: the run's config.json `data.shards`."""
    split: Literal["train", "val"] = "val"
    """Split to evaluate."""
    output: Path | None = None
    """Output folder; default: <run folder>/eval."""
    name: str | None = None
    """Report name; default: <split>-step<N> (N: the export's training step)."""
    full_res: bool = False
    """Also measure at each image's stored resolution (full-resolution L, as colorize writes)."""
    norm_mode: Literal["eval", "batch"] | None = None
    """Override the norm mode recorded in the export (see `train.py --help`, eval.norm_mode)."""
    limit: int | None = None
    """Evaluate only the first this many images of the split."""
    batch_size: int = 16
    """Images per forward pass in `eval` norm mode (`batch` mode runs one image at a time)."""
    gallery: int = 8
    """Images in the gallery PNG (the first ones of the split)."""
    weights_dir: Path | None = None
    """Folder with local network weights, never downloaded: FID is computed when it holds
    inception_v3_google-0cc3c7bd.pth (torchvision's Inception v3), LPIPS when it holds
    alexnet-owt-7be5be79.pth (torchvision's AlexNet) and alex.pth (LPIPS v0.1)."""


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


def _hwc(image: torch.Tensor) -> np.ndarray:
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
        print(f"warning: skipped {display_name(key)}: {detail}", file=sys.stderr)

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
            p, g, t = map(_hwc, (pred, gray, truth))
            result = ImageResult(index, key, image_metrics(p, t), image_metrics(g, t))
            if lpips_net is not None:
                result.model["lpips"], result.gray["lpips"] = lp_model.pop(0), lp_gray.pop(0)
            if full_res:
                full, t_full = rgb.to(device), _hwc(rgb)
                L_full, h, w = model_input(full, settings, 2 ** generator.num_downs)
                ab_full = predict_ab(generator, L_full, mode, [image_seed(key)])[0, :, :h, :w]
                pred_full = compose(full, ab_full)
                gray_full = _neutral(compose(full, torch.zeros(2, 1, 1, device=device)))
                result.full_model = image_metrics(_hwc(pred_full), t_full)
                result.full_gray = image_metrics(_hwc(gray_full), t_full)
            out.results.append(result)
            out.tiles[index] = Tiles(key, gray, pred, truth)
        _prune_tiles(out, keep_tiles)
    return out


def _prune_tiles(out: Evaluation, first: int) -> None:
    keep = set(sorted(out.tiles)[:first])
    keep |= {r.index for r in _extremes([r for r in out.results if r.index in out.tiles])}
    for index in set(out.tiles) - keep:
        del out.tiles[index]


def gather(part: Evaluation, expected: int) -> Evaluation:
    """All ranks' results on every rank, ordered by position; each position exactly once.

    Ranks read disjoint position ranges (sampling.rank_range), so nothing is padded; a position
    seen twice or a count that does not add up is a bug and raises."""
    parts = [part]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
        torch.distributed.all_gather_object(parts, part)
    merged = Evaluation(sorted((r for p in parts for r in p.results), key=lambda r: r.index), {})
    skipped: Counter[str] = Counter()
    for p in parts:
        skipped.update(p.skipped)
        merged.tiles.update(p.tiles)
        for name, feats in p.features.items():
            merged.features.setdefault(name, {}).update(feats)
    merged.skipped = dict(skipped)
    results, unique = merged.results, {r.index for r in merged.results}
    if len(unique) != len(results) or len(results) + skipped.total() != expected:
        raise RuntimeError(f"gathered {len(results)} results ({len(unique)} distinct) and "
                           f"{skipped.total()} skips for {expected} samples")
    return merged


# --- reports -------------------------------------------------------------------------------

def summary(results: list[ImageResult]) -> dict[str, dict[str, dict[str, float]]]:
    """{"train_res": {"model": means, "gray": means}, "full_res": ... (when measured)}."""
    out = {"train_res": {"model": mean_metrics([r.model for r in results]),
                         "gray": mean_metrics([r.gray for r in results])}}
    if results and results[0].full_model is not None:
        out["full_res"] = {"model": mean_metrics([r.full_model for r in results]),  # type: ignore[misc]
                           "gray": mean_metrics([r.full_gray for r in results])}  # type: ignore[misc]
    return out


def table(means: dict[str, dict[str, float]], title: str) -> str:
    """A Markdown table: the model row and the gray-baseline row."""
    lines = [f"**{title}**", "", "| | " + " | ".join(METRICS.values()) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for row, label in (("model", "model"), ("gray", "gray baseline (ab = 0)")):
        lines.append(f"| {label} | " + " | ".join(f"{means[row][k]:.3f}" for k in METRICS) + " |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    parts = [f"# Evaluation: {report['name']}", "",
             f"Generator `{report['generator']}` (step {s['step']}), shards `{report['shards']}` "
             f"split `{report['split']}`: {report['images']} images, skipped "
             f"{report['skipped'] or 'none'}; norm mode `{s['norm_mode']}`, resize "
             f"`{s['resize']}`, crop {s['crop_size']}; {report['processes']} process(es).", "",
             table(report["metrics"]["train_res"], f"At training resolution ({s['crop_size']}x"
                                                   f"{s['crop_size']})")]
    if "full_res" in report["metrics"]:
        parts += ["", table(report["metrics"]["full_res"], "At stored resolution (full-resolution L)")]
    fid = report["fid"]
    if isinstance(fid, dict):
        fid = (f"model {fid['model']:.2f}, gray baseline {fid['gray']:.2f} (torchvision Inception "
               f"v3 features at training resolution; lower is better)")
    lpips = report["lpips"]
    if isinstance(lpips, dict):
        lpips = (f"model {lpips['model']:.4f}, gray baseline {lpips['gray']:.4f} (AlexNet v0.1 at "
                 f"training resolution; lower is better)")
    parts += ["", f"LPIPS: {lpips}. FID: {fid}.", "",
              "Higher PSNR/SSIM and lower ab-L1 are better; dCF = CF(truth) - CF(pred) > 0 "
              "means duller than the truth. Definitions: pix2pix_dist/metrics.py."]
    return "\n".join(parts) + "\n"


def gallery_png(tiles: list[Tiles]) -> bytes:
    """One row per image: gray | prediction | truth, column titles on top, key under each row."""
    size = tiles[0].truth.shape[-1]
    pad, head, foot = 4, 16, 14
    width = 3 * size + 4 * pad
    canvas = Image.new("RGB", (width, head + len(tiles) * (size + foot + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(("gray", "prediction", "truth")):
        draw.text((pad + col * (size + pad), 2), label, fill="black")
    for row, t in enumerate(tiles):
        top = head + row * (size + foot + pad)
        for col, img in enumerate((t.gray, t.pred, t.truth)):
            canvas.paste(Image.fromarray(_hwc(img)), (pad + col * (size + pad), top))
        draw.text((pad, top + size + 1), t.key[:width // 6], fill="black")
    png = io.BytesIO()
    canvas.save(png, format="PNG")
    return png.getvalue()


# --- the command ---------------------------------------------------------------------------

def _resolve(opts: EvalOptions) -> tuple[Path, Path, Path]:
    """(export file, shards folder, output folder) from the options; CliError when unclear."""
    target = opts.target
    export = export_path(target)
    # The run folder: the target, or the one holding the export (in its root or a checkpoint).
    run = next((folder for folder in (target, target.parent, target.parent.parent.parent)
                if (folder / "config.json").is_file()), None)
    shards = opts.shards
    if shards is None:
        if run is None:
            raise CliError(f"no config.json found for {target}; give --shards")
        try:
            shards = Path(json.loads((run / "config.json").read_text())["data"]["shards"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CliError(f"cannot read data.shards from {run / 'config.json'} ({exc}); "
                           f"give --shards") from None
    output = opts.output or (run or export.parent) / "eval"
    if opts.name is not None and not re.fullmatch(r"[\w-][\w.-]*", opts.name):
        raise CliError(f"--name {opts.name!r}: use letters, digits, '_', '-' and '.' (it names files)")
    if output.exists() and not output.is_dir():
        raise CliError(f"--output {output} exists and is not a folder")
    if opts.weights_dir is not None and not opts.weights_dir.is_dir():
        # A mistyped folder would otherwise read as "no local weights" in the report.
        raise CliError(f"--weights-dir {opts.weights_dir} is not a folder")
    if opts.limit is not None and opts.limit < 1 or opts.batch_size < 1 or opts.gallery < 0:
        raise CliError("--limit and --batch-size must be at least 1, --gallery at least 0")
    return export, shards, output


@contextlib.contextmanager
def _new_folder(path: Path) -> Iterator[None]:
    """Create `path` for the block; if the block fails, remove the folders it created that are
    still empty (a failed evaluation leaves no empty eval/ behind)."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in created:  # innermost first; a folder with files in it stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def run(opts: EvalOptions) -> dict[str, Any]:
    """Evaluate on every process of the current launch; rank 0 writes and returns the report."""
    from accelerate import PartialState

    export_path, shards_path, output = _resolve(opts)
    # Made now, so that a read-only or impossible --output fails before the work.
    with _new_folder(output):
        state = PartialState(cpu=not torch.cuda.is_available())
        exported = load_export(export_path, state.device)
        settings = exported.settings
        mode: NormMode = opts.norm_mode or settings.norm_mode
        try:
            fid_net = fid_network(opts.weights_dir, state.device)
            lpips_net = lpips_network(opts.weights_dir, state.device)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        shards = find_shards(shards_path, opts.split)
        total = min(shards.total, opts.limit or shards.total)
        start, stop = rank_range(total, state.num_processes, state.process_index)
        part = evaluate_samples(exported.generator, settings, mode, read_split(shards, start, stop),
                                device=state.device, batch_size=opts.batch_size,
                                full_res=opts.full_res, keep_tiles=opts.gallery, fid_net=fid_net,
                                lpips_net=lpips_net)
        merged = gather(part, total)
        if not merged.results:
            raise DataError(f"no decodable images in the {opts.split} split of {shards_path}")
        name = opts.name or f"{opts.split}-step{settings.step:08d}"
        report = {
            "name": name, "generator": str(export_path), "shards": str(shards_path),
            "split": opts.split, "images": len(merged.results), "skipped": merged.skipped,
            "processes": state.num_processes,
            "settings": {**dataclasses.asdict(settings), "norm_mode": mode},
            "metrics": summary(merged.results), "lpips": lpips_report(merged.results),
            "fid": fid_report(merged),
            "per_image": [dataclasses.asdict(r) for r in merged.results],
        }
        if state.is_main_process:
            _write(report, merged, output, name, opts.gallery)
        return report


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


def _extremes(results: list[ImageResult]) -> list[ImageResult]:
    """The EXTREMES best then the EXTREMES worst by ab-L1 (each once), best first."""
    ranked = sorted(results, key=lambda r: r.model["ab_l1"])
    return ranked[:EXTREMES] + [r for r in ranked[-EXTREMES:] if r not in ranked[:EXTREMES]]


def best_and_worst(merged: Evaluation) -> list[Tiles]:
    """The extremes' tiles, each captioned with its ab-L1 so the picture says which rows are
    which."""
    return [dataclasses.replace(merged.tiles[r.index], key=f"ab-L1 {r.model['ab_l1']:.2f}  {r.key}")
            for r in _extremes(merged.results)]


def _write(report: dict[str, Any], merged: Evaluation, output: Path, name: str, gallery: int) -> None:
    text = markdown(report)
    files = {".json": json.dumps(report, indent=1) + "\n", ".md": text}
    if first := [merged.tiles[r.index] for r in merged.results[:gallery]]:
        files["-gallery.png"] = gallery_png(first)
    files["-best-worst.png"] = gallery_png(best_and_worst(merged))
    for suffix, data in files.items():
        atomic_write(output / f"{name}{suffix}", data)
    print(text + f"\nwritten: {output / name}{', '.join(files)}", flush=True)


class TrainingEval:
    """The training loop's periodic evaluation on the first `eval.count` validation images,
    held decoded in memory (main process only). Shards without a val split are evaluated on
    their first train images, with a notice, as the sample grids do."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        try:
            shards = find_shards(cfg.data.shards, "val")
        except DataError:
            shards = find_shards(cfg.data.shards, "train")
            print(f"notice: {cfg.data.shards} has no val split; eval.every evaluates the first "
                  f"{cfg.eval.count} train images (scores on training data)", flush=True)
        count = min(cfg.eval.count, shards.total)
        self.samples = [s for s in read_split(shards, 0, count) if not isinstance(s[2], str)]
        self.cfg, self.device = cfg, device

    def __call__(self, generator: torch.nn.Module, step: int) -> dict[str, float]:
        """eval/* scalars of `generator` (the training model is not modified)."""
        meta = generator_meta(self.cfg, step)
        settings = InferenceSettings(**meta["inference"])
        copy = inference_copy(generator, meta["model"])
        result = evaluate_samples(copy, settings, settings.norm_mode, iter(self.samples),
                                  device=self.device, batch_size=16)
        means = summary(result.results)["train_res"]
        return {**{f"eval/{k}": v for k, v in means["model"].items()},
                **{f"eval/gray_{k}": means["gray"][k] for k in ("psnr", "ssim", "ab_l1")}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(EvalOptions, argv, prog="pix2pix-eval", description=__doc__.split("\n\n")[0])
        run(opts)
    except (CliError, ExportError, DataError, OSError) as exc:  # OSError: a full or read-only disk
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
