"""Experiment tracking behind one small interface: wandb, tensorboard or none, via Accelerate.

Whatever the tracker, the run folder always gets `stats.jsonl` (one JSON line per scalar log)
and `samples/step-NNNNNN.png` grids, so a run can be inspected without any tracker.
Only the main process does anything; on other ranks every method is a no-op.

Usage (the Accelerator needs a project_dir because Accelerate insists on a logging directory
for tensorboard when it is constructed):

    accelerator = Accelerator(log_with=tracker_for(cfg), project_dir=run_dir)
    tracker = RunTracker(accelerator, cfg, run_dir, resume_step=step, recipe=recipe)
    tracker.log_scalars(step, {"loss_g": 1.2})
    tracker.log_grid(step, gray, pred, truth)
    tracker.close()
"""

from __future__ import annotations

import contextlib
import io
import json
import netrc
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from pix2pix_dist.atomic import atomic_write
from pix2pix_dist.config import Config, ConfigError, leaf_items
from pix2pix_dist.files import open_fd, read_text

if TYPE_CHECKING:
    from accelerate import Accelerator

    from pix2pix_dist.recipe import Recipe

GRID_PADDING = 2
"""Pixels of white padding around and between the tiles of a sample grid."""


def tracker_for(cfg: Config) -> str | None:
    """What to pass as `Accelerator(log_with=...)`."""
    return None if cfg.log.tracker == "none" else cfg.log.tracker


def check_tracker(tracker: str) -> None:
    """Refuse, in one line, a wandb setup that would prompt for an API key: wandb asks on a
    terminal, and a batch job would wait on it forever. Cheap: call it before any real work."""
    mode = os.environ.get("WANDB_MODE")
    if tracker == "wandb" and mode in ("online", "run") and not _wandb_credentials_configured():
        raise ConfigError(
            f"WANDB_MODE={mode} but no W&B credentials are configured: set WANDB_API_KEY "
            "or run `wandb login`, or unset WANDB_MODE to log offline")


class RunTracker:
    """Scalars and sample grids of one run, sent to the tracker and kept in the run folder."""

    def __init__(self, accelerator: Accelerator, cfg: Config, run_dir: Path,
                 resume_step: int, recipe: Recipe) -> None:
        self.accelerator = accelerator
        self.kind = cfg.log.tracker
        self.run_dir = Path(run_dir)
        self.stats_path = self.run_dir / "stats.jsonl"
        self.samples_dir = self.run_dir / "samples"
        self.is_main = accelerator.is_main_process
        if not self.is_main:
            return
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        if self.kind == "tensorboard":
            # Accelerate reads the logging dir when the trackers start, so it can be set here
            # whatever the caller passed as project_dir.
            accelerator.project_configuration.logging_dir = str(self.run_dir / "tensorboard")
        if self.kind != "none":
            # Flat scalars: the config as given (data.batch_size=0 means "derived", as in
            # config.json, which must stay valid on another world size) and the recipe it
            # resolved to on this run (recipe.batch_per_process, recipe.steps, recipe.lr, ...).
            hparams = dict(leaf_items(cfg)) | {f"recipe.{k}": v for k, v in vars(recipe).items()}
            wandb_kwargs = self._wandb_init_kwargs(resume_step) if self.kind == "wandb" else {}
            accelerator.init_trackers(project_name=cfg.log.project, config=hparams,
                                      init_kwargs={"wandb": wandb_kwargs})
        if self.kind == "wandb":
            _announce_wandb_run(accelerator.get_tracker("wandb", unwrap=True))
        # A resumed run repeats the steps after its checkpoint: drop their old lines (once the
        # tracker has started, so a run that fails to start leaves the file as it was).
        _truncate_stats(self.stats_path, resume_step)

    def _wandb_init_kwargs(self, resume_step: int) -> dict[str, Any]:
        # Resuming continues the same wandb run; a fresh start (step 0) gets a new id, since
        # wandb ignores steps lower than those a run has already logged.
        id_path = self.run_dir / "wandb_run_id.txt"
        if resume_step > 0 and id_path.exists():
            run_id = read_text(id_path).strip()
        else:
            run_id = secrets.token_hex(4)  # wandb ids: lowercase letters and digits
            atomic_write(id_path, run_id + "\n")
        check_tracker(self.kind)
        offline = os.environ.get("WANDB_MODE") is None and not _wandb_credentials_configured()
        return dict(dir=str(self.run_dir), name=self.run_dir.name, id=run_id, resume="allow",
                    mode="offline" if offline else None)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Send scalars to the tracker and append them as one line to stats.jsonl."""
        if not self.is_main:
            return
        values = {key: float(value) for key, value in values.items()}
        self.accelerator.log(values, step=step)
        line = json.dumps({"step": step, **values, "time": time.time()})
        # Closed (flushed) per line: survives a crash. open_fd: a FIFO would block open().
        with open(open_fd(self.stats_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
            f.write(line + "\n")

    def log_grid(self, step: int, gray: torch.Tensor, pred: torch.Tensor,
                 truth: torch.Tensor) -> Path:
        """Save one grid (a row per sample: gray | prediction | truth) and send it to the tracker.

        Each input is (N, 3, H, W) RGB in [0, 1] (gray may have 1 channel). Returns the PNG
        path, which is only written on the main process.
        """
        path = self.samples_dir / f"step-{step:06d}.png"
        if not self.is_main:
            return path
        tiles = torch.stack([gray.expand_as(pred), pred, truth], dim=1).flatten(0, 1)
        grid = make_grid(tiles.detach().float().clamp(0, 1).cpu(), nrow=3,
                         padding=GRID_PADDING, pad_value=1.0)
        pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # HWC
        image = Image.fromarray(pixels)
        png = io.BytesIO()
        image.save(png, format="PNG")
        atomic_write(path, png.getvalue())
        atomic_write(self.samples_dir / "latest.png", png.getvalue())

        # Both trackers get the uint8 pixels of the PNG: wandb >= 0.30 casts float arrays to
        # uint8 without scaling (a [0, 1] float image comes out black).
        if self.kind == "wandb":
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.log({"samples": wandb.Image(image, caption="gray | prediction | truth")},
                    step=step)
        elif self.kind == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("samples", pixels, global_step=step, dataformats="HWC")
        return path

    def close(self) -> None:
        """Finish the trackers so that the run folder is complete.

        Not `accelerator.end_training()`: that also destroys the process group, which belongs
        to the caller (it may still need collectives after the run is logged).
        """
        if not self.is_main:
            return
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self.kind == "wandb":
            import wandb

            # run.finish() returns before wandb's service has written the end of the .wandb
            # file; teardown waits for it.
            wandb.teardown()


def _wandb_credentials_configured() -> bool:
    """Whether wandb would find an API key without asking: env variables or a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _announce_wandb_run(run: Any) -> None:
    if run.settings.mode == "offline":
        sync_dir = run.settings.sync_dir
        print(f"wandb: offline run in {sync_dir} (upload it later with `wandb sync {sync_dir}`)",
              flush=True)
    elif run.settings.mode == "disabled":
        print("wandb: disabled (WANDB_MODE=disabled); stats.jsonl and samples/ are still written",
              flush=True)
    else:
        print(f"wandb: run at {run.url}", flush=True)


def _truncate_stats(path: Path, resume_step: int) -> None:
    """Keep only the lines with step <= resume_step, atomically."""
    if not path.exists():
        return
    kept = []
    for line in read_text(path).splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a line torn by a crash
            if json.loads(line)["step"] <= resume_step:
                kept.append(line + "\n")
    atomic_write(path, "".join(kept))
