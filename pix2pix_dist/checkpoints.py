"""Checkpoints: atomic full training state for resume, plus small generator exports for inference.

Layout of a run folder:
    checkpoints/step-00001000/state.pt              models, optimizers, scaler, counters (rank 0)
    checkpoints/step-00001000/rng-rank{R}.pt        each process's RNG state
    checkpoints/step-00001000/generator.safetensors generator only, for inference
    generator.safetensors                           the newest generator export
A checkpoint is written into `step-N.tmp/` and renamed when every file is on disk, so a folder
named `step-N` is always complete; a crash mid-write leaves only a `.tmp` that the next save
removes. Everything is plain tensors and Python scalars, so it loads with `weights_only=True`.
The run folder must be on storage every node can reach (as usual for multi-node training).
"""

from __future__ import annotations

import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import fsync_dir
from .export import export_generator

PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, reported as one line."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (`.tmp` folders are incomplete by construction)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], generator: nn.Module,
                    generator_meta: dict[str, Any], *, rank: int, barrier, keep: int) -> Path:
    """Write a checkpoint collectively: every rank calls this with the same step.

    `state` is only used on rank 0; `barrier` is a no-argument callable that synchronises ranks."""
    final = checkpoint_root(run_dir) / f"{PREFIX}{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        # Also clear what a crash during an earlier save left (each is a full checkpoint).
        for stale in checkpoint_root(run_dir).glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    _save_file(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        _save_file(state, tmp / "state.pt")
        export_generator(generator, tmp / "generator.safetensors", generator_meta)
    barrier()
    if rank == 0:
        if final.exists():  # the same step saved again (e.g. a signal right after a save)
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(final.parent)
        export_generator(generator, Path(run_dir) / "generator.safetensors", generator_meta)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(training state, this rank's RNG state or None when it was saved with fewer ranks)."""
    rng_file = path / f"rng-rank{rank}.pt"
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.exists() else None
    except Exception as exc:  # truncated file, wrong format, missing folder
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}".splitlines()[0]) from None
    return state, rng


def latest_loadable(run_dir: Path) -> Path | None:
    """The newest checkpoint whose state file is intact, skipping damaged ones with a notice.

    torch.save writes a zip archive whose directory sits at the end, so opening it detects a
    truncated file without reading the (possibly large) tensors."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            with zipfile.ZipFile(path / "state.pt"):
                return path
        except (OSError, zipfile.BadZipFile) as exc:
            print(f"warning: skipping damaged checkpoint {path}: {exc}")
    return None
