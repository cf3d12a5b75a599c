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
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import tyro
from PIL import Image, ImageDraw

from .atomic import atomic_write
from .cli import CliError, Maybe, parse
from .data import DataError
from .data.sampling import rank_range
from .data.shards_index import find_shards
from .errors import run_main
from .evaluation import (Evaluation, Tiles, evaluate_samples, extremes, fid_report, gather, hwc,
                         lpips_report, read_split, summary)
from .export import NormMode, export_path, load_export
from .metrics import METRICS, fid_network, lpips_network


@dataclass
class EvalOptions:
    target: tyro.conf.Positional[Path]
    """A run folder (its generator.safetensors and config.json) or a generator export file."""
    shards: Maybe[Path] = None
    """Shard folder; default: the run's config.json `data.shards`."""
    split: Literal["train", "val"] = "val"
    """Split to evaluate."""
    output: Maybe[Path] = None
    """Output folder; default: <run folder>/eval."""
    name: Maybe[str] = None
    """Report name; default: <split>-step<N> (N: the export's training step)."""
    full_res: bool = False
    """Also measure at each image's stored resolution (full-resolution L, as colorize writes)."""
    norm_mode: Maybe[Literal["eval", "batch"]] = None
    """Override the norm mode recorded in the export (see `train.py --help`, eval.norm_mode)."""
    limit: Maybe[int] = None
    """Evaluate only the first this many images of the split."""
    batch_size: int = 16
    """Images per forward pass in `eval` norm mode (`batch` mode runs one image at a time)."""
    gallery: int = 8
    """Images in the gallery PNG (the first ones of the split)."""
    weights_dir: Maybe[Path] = None
    """Folder with local network weights, never downloaded: FID is computed when it holds
    inception_v3_google-0cc3c7bd.pth (torchvision's Inception v3), LPIPS when it holds
    alexnet-owt-7be5be79.pth (torchvision's AlexNet) and alex.pth (LPIPS v0.1)."""


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
            canvas.paste(Image.fromarray(hwc(img)), (pad + col * (size + pad), top))
        draw.text((pad, top + size + 1), t.key[:width // 6], fill="black")
    png = io.BytesIO()
    canvas.save(png, format="PNG")
    return png.getvalue()


def best_and_worst(merged: Evaluation) -> list[Tiles]:
    """The extremes' tiles, each captioned with its ab-L1 so the picture says which rows are
    which."""
    return [dataclasses.replace(merged.tiles[r.index], key=f"ab-L1 {r.model['ab_l1']:.2f}  {r.key}")
            for r in extremes(merged.results)]


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
        fid_net = fid_network(opts.weights_dir, state.device)
        lpips_net = lpips_network(opts.weights_dir, state.device)
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


def _write(report: dict[str, Any], merged: Evaluation, output: Path, name: str, gallery: int) -> None:
    text = markdown(report)
    files = {".json": json.dumps(report, indent=1) + "\n", ".md": text}
    if first := [merged.tiles[r.index] for r in merged.results[:gallery]]:
        files["-gallery.png"] = gallery_png(first)
    files["-best-worst.png"] = gallery_png(best_and_worst(merged))
    for suffix, data in files.items():
        atomic_write(output / f"{name}{suffix}", data)
    print(text + f"\nwritten: {output / name}{', '.join(files)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        run(parse(EvalOptions, argv, prog="pix2pix-eval", description=__doc__.split("\n\n")[0]))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
