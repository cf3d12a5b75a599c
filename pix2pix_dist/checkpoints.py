"""Checkpoints: the training state's single owner (what a checkpoint holds, how it is written,
verified and restored), plus small generator exports for inference.

Layout of a run folder:
    checkpoints/step-00001000/state.pt              models, optimizers, scaler, counters, model
                                                    settings, global batch (rank 0)
    checkpoints/step-00001000/rng-rank{R}.pt        each process's RNG state
    checkpoints/step-00001000/generator.safetensors generator only, for inference
    checkpoints/step-00001000/manifest.json         size and sha256 of each file above
    generator.safetensors                           the newest generator export
A checkpoint is written into `step-N.tmp/`, its manifest last, and renamed when every file is on
disk, so a folder named `step-N` is always complete and its manifest says what its files held.
Everything is plain tensors and Python scalars, so it loads with `weights_only=True`.
The run folder must be on storage every node can reach (as usual for multi-node training).
Design notes (resume semantics, integrity, fallback): docs/design.md, "Checkpoints and resume".
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atomic import atomic_write, file_sha256, fsync_dir
from .config import RENAMED_NORMS
from .export import EXPORT_NAME, export_generator, nonfinite_entries
from .errors import UserError, warn
from .files import read_text
from .ranks import agree, all_gather

if TYPE_CHECKING:
    from .gan_step import Networks
    from .recipe import Recipe

PREFIX = "step-"
DAMAGED_SUFFIX = ".damaged"
"""A damaged checkpoint passed over by resume is renamed `step-N.damaged`."""
MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be written or used, reported as one line."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (`.tmp` folders are incomplete by construction)."""
    found = [p for p in checkpoint_root(run_dir).glob(f"{PREFIX}*")  # none without the folder
             if p.is_dir() and folder_step(p) is not None]
    return sorted(found, key=folder_step)


def _file_entry(path: Path) -> dict[str, Any]:
    """A file's manifest entry, read back from disk, so it is what reached the file."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def folder_step(path: Path) -> int | None:
    """N of a `step-N` folder name; None for another name (a checkpoint the user moved)."""
    digits = path.name[len(PREFIX):]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file the manifest lists has its recorded size and
    sha256 (sizes first: a truncated file is found without reading it), and a `step-N` folder's
    manifest is that of step N (a copied or renamed folder would resume at the wrong step)."""
    try:
        manifest = json.loads(read_text(path / MANIFEST))
        files = manifest["files"]
        named = folder_step(path)
        if named is not None and manifest["step"] != named:
            raise CheckpointError(f"the folder is named for step {named} but holds step "
                                  f"{manifest['step']!r} (copied or renamed?)")
        if "state.pt" not in files:
            raise CheckpointError(f"{path / MANIFEST} lists no state.pt")
        for name, entry in files.items():
            if Path(name).name != name or name in (".", ".."):  # from a file: never a path
                raise CheckpointError(f"{path / MANIFEST} lists a file outside the checkpoint")
            if (path / name).stat().st_size != entry["bytes"]:
                raise CheckpointError(f"{name} is {(path / name).stat().st_size} bytes, "
                                      f"{entry['bytes']} when saved")
        for name, entry in files.items():
            if file_sha256(path / name) != entry["sha256"]:
                raise CheckpointError(f"{name} does not match its sha256 (damaged after saving)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"unreadable manifest or file ({type(exc).__name__}: {exc})") from exc


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


class _WriteErrorKeeper(io.BufferedWriter):
    """A file for torch.save that keeps the OSError of a failed write: torch turns it into a
    RuntimeError ("unexpected pos ...") that no longer says the disk is full."""
    error: OSError | None = None

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError as exc:
            self.error = exc
            raise


def _save_file(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save + fsync; the file's manifest entry."""
    with _WriteErrorKeeper(io.FileIO(path, "w")) as f:
        try:
            torch.save(obj, f)
        except RuntimeError:
            if f.error is None:
                raise
            raise f.error from None  # the RuntimeError only repeats it, less clearly
        f.flush()
        os.fsync(f.fileno())
    return _file_entry(path)


def _write_error(what: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    hint = "; free some space and run again to resume" if exc.errno in (28, 122) else ""
    return f"cannot write checkpoint {what}: {reason}{where}{hint}"


# What torch.load raises on a file that is not what it should be (checksums make these rare).
_LOAD_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError)


class CheckpointManager:
    """Saves and restores one run's full training state, collectively: every rank calls
    `save`/`resume` at the same point. Rank 0 writes the shared files and chooses what to
    resume from; every rank writes its RNG state and loads the chosen checkpoint."""

    def __init__(self, run_dir: Path, nets: "Networks", accelerator, *, keep: int,
                 model: dict[str, Any], recipe: "Recipe",
                 export_meta: Callable[[int], dict[str, dict[str, Any]]]) -> None:
        """`model`: the settings a resume must match (so must the recipe's global batch);
        `export_meta(step)`: what a generator export at `step` records (export.generator_meta)."""
        self.run_dir, self.nets, self.accelerator = Path(run_dir), nets, accelerator
        self.keep, self.model, self.recipe, self.export_meta = keep, model, recipe, export_meta
        self.rank, self.main = accelerator.process_index, accelerator.is_main_process
        self.resumed_from: Path | None = None
        """The checkpoint `resume` restored, if any."""
        self.last_good: Path | None = None
        """The newest checkpoint this run saved or resumed from: both are checked finite."""

    # --- what a checkpoint holds --------------------------------------------------------------
    def _state(self, step: int, nonfinite: int) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "G": self.nets.G_raw.state_dict(), "D": self.nets.D_raw.state_dict(),
            "opt_G": self.nets.opt_G.state_dict(), "opt_D": self.nets.opt_D.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": step, "nonfinite": nonfinite, "model": self.model,
            "global_batch": self.recipe.global_batch,
        }

    def _apply(self, state: dict[str, Any]) -> tuple[int, int]:
        self.nets.G_raw.load_state_dict(state["G"])
        self.nets.D_raw.load_state_dict(state["D"])
        self.nets.opt_G.load_state_dict(state["opt_G"])
        self.nets.opt_D.load_state_dict(state["opt_D"])
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        return int(state["step"]), int(state["nonfinite"])

    def advice(self) -> str:
        # Only what this run saved or resumed from is known to be finite: a checkpoint that was
        # merely found in the folder is never called good.
        if self.last_good is None:
            return "no checkpoint was saved; lower optim.lr and start again"
        return (f"the last good checkpoint is {self.last_good}; lower optim.lr and run again to "
                f"resume from it")

    def _nonfinite(self) -> str | None:
        """The NaN/inf weights, optimizer moments or G BatchNorm statistics (inference uses
        them), as 'G.x, D.y and 3 more'; None when all are finite. D's statistics are left out:
        D always runs in training mode, so they are never used, and a non-finite loss (a
        skipped step) leaves them NaN."""
        bad = nonfinite_entries({"G": self.nets.G_raw.state_dict(),
                                 "D": dict(self.nets.D_raw.named_parameters()),
                                 "opt_G": self.nets.opt_G.state_dict()["state"],
                                 "opt_D": self.nets.opt_D.state_dict()["state"]})
        return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") if bad else None

    def check_finite(self, step: int) -> None:
        """Collective: stop (CheckpointError on every rank) when any state `_nonfinite` checks is
        NaN/inf. Every rank checks: statistics are per rank."""
        bad = self._nonfinite()
        agree(f"weights are not finite at step {step} ({bad}); nothing saved: "
              f"{self.advice()}" if bad else None, CheckpointError)

    # --- save ---------------------------------------------------------------------------------
    def save(self, step: int, nonfinite: int) -> Path:
        """Write checkpoint `step` (every rank calls this); refuse non-finite weights."""
        self.check_finite(step)
        root = checkpoint_root(self.run_dir)
        final = root / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        error = None
        if self.main:
            try:  # also clear what a crash during an earlier save left (each is a full checkpoint)
                for stale in root.glob(f"{PREFIX}*.tmp"):
                    shutil.rmtree(stale)
                tmp.mkdir(parents=True)
            except OSError as exc:
                error = _write_error(final, exc)
        agree(error, CheckpointError)

        files: dict[str, Any] = {}
        try:
            files[f"rng-rank{self.rank}.pt"] = _save_file(rng_state(), tmp / f"rng-rank{self.rank}.pt")
            if self.main:
                files["state.pt"] = _save_file(self._state(step, nonfinite), tmp / "state.pt")
                export_generator(self.nets.G_raw, tmp / EXPORT_NAME, self.export_meta(step))
                files[EXPORT_NAME] = _file_entry(tmp / EXPORT_NAME)
        except OSError as exc:
            error = _write_error(final, exc)
        gathered = all_gather((files, error))
        error = next((e for _, e in gathered if e), None)
        if error is None and self.main:
            try:
                manifest = {"format": FORMAT, "step": step, "world_size": len(gathered),
                            "files": {k: v for f, _ in gathered for k, v in sorted(f.items())}}
                atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
                if final.exists():  # the same step saved again (e.g. a signal right after a save)
                    shutil.rmtree(final)
                tmp.rename(final)
                fsync_dir(root)
                export_generator(self.nets.G_raw, self.run_dir / EXPORT_NAME, self.export_meta(step))
                for old in list_checkpoints(self.run_dir)[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError as exc:
                error = _write_error(final, exc)
        if error is not None and self.main:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not keep a partial copy
        agree(error, CheckpointError)
        self.last_good = final
        return final

    # --- resume -------------------------------------------------------------------------------
    def resume(self, resume: str, seed: int) -> tuple[int, int]:
        """Restore the checkpoint `resume` names ("auto": the newest intact one; "never"; a
        path) and seed the RNGs; returns (step, non-finite steps so far), (0, 0) when fresh."""
        from accelerate.utils import set_seed

        path = self._choose(resume)
        if path is None:
            set_seed(seed, device_specific=True)  # different dropout noise per rank
            return 0, 0
        # Every rank loads the checkpoint rank 0 chose, so DDP replicas stay identical.
        error, rng, counters = None, None, (0, 0)
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            self._check_same_model(state, path)
            self._check_same_global_batch(state, path)
            rng_file = path / f"rng-rank{self.rank}.pt"
            rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.exists() else None
            counters = self._apply(state)
            if bad := self._nonfinite():
                raise CheckpointError(
                    f"{path} holds non-finite values ({bad}) and cannot be resumed; move it "
                    f"away (ckpt.resume=auto then takes the one before) or choose a new run_dir")
        except CheckpointError as exc:
            error = str(exc)
        except _LOAD_ERRORS as exc:
            error = f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}".splitlines()[0]
        agree(error, CheckpointError)
        self.resumed_from = self.last_good = path
        if rng is not None:
            set_rng_state(rng)
        else:  # resumed with more processes than saved: fresh noise for the new ranks
            set_seed(seed + counters[0], device_specific=True)
        return counters

    def _choose(self, resume: str) -> Path | None:
        """Rank 0 picks (ranks that looked on their own could see different listings: network
        file systems lag) and sends its choice, or its error, to every rank."""
        picked, error = None, None
        if self.main:
            try:
                picked = self._pick(resume)
            except CheckpointError as exc:
                error = str(exc)
        agree(error, CheckpointError)
        return all_gather(picked)[0]

    def _pick(self, resume: str) -> Path | None:
        existing = list_checkpoints(self.run_dir)
        if resume == "never":
            if existing:
                raise CheckpointError(
                    f"{self.run_dir} already holds checkpoints up to {existing[-1].name} and "
                    f"ckpt.resume=never would overwrite that run; choose a new run_dir, or "
                    f"ckpt.resume=auto to continue it")
            return None
        if resume != "auto":  # a checkpoint the user named: no silent substitute
            try:
                verify_checkpoint(Path(resume))
            except CheckpointError as exc:
                raise CheckpointError(f"checkpoint {resume} is damaged: {exc}") from exc
            return Path(resume)
        damaged: list[Path] = []
        for path in reversed(existing):
            try:
                verify_checkpoint(path)
            except CheckpointError as exc:
                warn(f"skipping damaged checkpoint {path}: {exc}; trying the one before")
                damaged.append(path)
                continue
            # Moved aside (kept for inspection), so that pruning after the next saves counts
            # only intact checkpoints and never deletes this good one while keeping them.
            for bad in damaged:
                aside = bad.with_name(bad.name + DAMAGED_SUFFIX)
                shutil.rmtree(aside, ignore_errors=True)
                bad.rename(aside)
                warn(f"moved damaged checkpoint {bad.name} aside to {aside.name}")
            return path
        if existing:
            raise CheckpointError(f"every checkpoint in {checkpoint_root(self.run_dir)} is damaged "
                                  f"(see the warnings above); move them away to start again, or "
                                  f"choose a new run_dir")
        return None

    def _check_same_global_batch(self, state: dict[str, Any], path: Path) -> None:
        """Resuming on another number of processes keeps the schedule only with the same global
        batch (data.global_batch splits itself; a pinned data.batch_size does not)."""
        saved, recipe = state.get("global_batch"), self.recipe
        if saved is not None and saved != recipe.global_batch:
            raise CheckpointError(
                f"{path} was trained with a global batch of {saved}, this run's is "
                f"{recipe.global_batch} ({recipe.batch_per_process}/process x {recipe.world_size}); "
                f"resuming would change the recipe. Set data.global_batch={saved} without "
                f"data.batch_size, or use a new run_dir")

    def _check_same_model(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint whose model settings differ, including settings that were added
        or removed since it was saved (its weights may not mean the same thing)."""
        saved, current = dict(state.get("model", {})), self.model
        if isinstance(saved.get("norm"), str):  # the same model under an old name
            saved["norm"] = RENAMED_NORMS.get(saved["norm"], saved["norm"])
        changes = []
        for key in sorted(saved.keys() | current.keys()):
            if key not in current:
                changes.append(f"model.{key} is no longer a setting (checkpoint: {saved[key]!r})")
            elif key not in saved:
                changes.append(f"model.{key}={current[key]!r} is not in the checkpoint")
            elif saved[key] != current[key]:
                changes.append(f"model.{key}={current[key]!r} (checkpoint: {saved[key]!r})")
        if changes:
            raise CheckpointError(f"{path} was saved with a different model: {', '.join(changes)}; "
                                  f"use the checkpoint's settings or a new run_dir")

