"""A recipe resolved for one world size: batches, steps, learning rate and its schedule.

The config states the recipe in global terms (data.global_batch images per optimizer step over
all processes, train.epochs passes over the train split); this module derives what each process
does from the world size and the train split's size, so the same preset is the same run on 1
GPU or 64. See docs/design.md, "Recipes".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config, ConfigError


@dataclass(frozen=True)
class Recipe:
    world_size: int
    global_batch: int
    """Images per optimizer step, all processes together."""
    batch_per_process: int
    train_images: int
    """Samples in the train split (from the shards' manifest)."""
    steps_per_epoch: int
    """train_images // global_batch: the loop drops the incomplete last batch of an epoch."""
    steps: int
    """Optimizer steps in the whole run."""
    decay_steps: int
    """The last this many steps decay the learning rate linearly to exactly 0."""
    lr: float
    """Peak learning rate after optim.lr_scaling."""
    lr_rule: str
    """How `lr` was obtained, for the log."""
    norm_rule: str
    """Which images each normalisation layer's statistics cover (model.norm), for the log."""

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` for the update that follows `step` completed steps (0-based).

        Constant, then over the last `decay_steps` updates (decay-1)/decay, ..., 1/decay, 0: the
        final update of a decaying recipe runs at exactly 0, and a constant recipe stays at 1."""
        if self.decay_steps <= 0:
            return 1.0
        return min(1.0, max(0.0, (self.steps - 1 - step) / self.decay_steps))

    def describe(self) -> str:
        """One line with every derived number (the start log line and --dry-run)."""
        schedule = (f"constant lr for {self.steps - self.decay_steps} steps, then linear decay "
                    f"to 0 over the last {self.decay_steps}" if self.decay_steps else "constant lr")
        return (f"recipe: global batch {self.global_batch} = {self.batch_per_process}/process x "
                f"{self.world_size} process(es); {self.steps} steps = {self.epochs:g} epochs of "
                f"{self.train_images} train images ({self.steps_per_epoch} steps/epoch); "
                f"lr {self.lr:.6g} ({self.lr_rule}); {schedule}; {self.norm_rule}")


def resolve_recipe(cfg: Config, world_size: int, train_images: int) -> Recipe:
    """The recipe of `cfg` on `world_size` processes; ConfigError (one line) when it cannot run.

    Precedence: a pinned data.batch_size makes the global batch batch_size x world_size;
    otherwise data.global_batch is split evenly and must be divisible by the world size.
    A pinned train.steps replaces the length derived from train.epochs."""
    if cfg.data.batch_size:
        per_process = cfg.data.batch_size
        global_batch = per_process * world_size
    else:
        global_batch = cfg.data.global_batch
        if global_batch % world_size:
            below = global_batch - global_batch % world_size
            nearest = f"{below} or {below + world_size}" if below else str(world_size)
            raise ConfigError(
                f"data.global_batch={global_batch} is not divisible by {world_size} processes; "
                f"nearest valid sizes: {nearest} (or pin the per-process batch with "
                f"data.batch_size)")
        per_process = global_batch // world_size
    steps_per_epoch = train_images // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the train split has {train_images} images, fewer than one global batch of "
            f"{global_batch} ({per_process}/process x {world_size}); lower data.global_batch "
            f"(or data.batch_size), use fewer processes or write more data")
    steps = cfg.train.steps or max(1, round(cfg.train.epochs * steps_per_epoch))
    o = cfg.optim
    decay_steps = min(steps, math.ceil(o.decay_fraction * steps - 1e-9))
    ratio = global_batch / o.reference_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[o.lr_scaling]
    lr_rule = f"optim.lr {o.lr:g} at reference batch {o.reference_batch}, lr_scaling={o.lr_scaling}"
    if o.lr_scaling != "none":
        lr_rule += f": x {factor:.4g}"
    return Recipe(world_size, global_batch, per_process, train_images, steps_per_epoch, steps,
                  decay_steps, o.lr * factor, lr_rule, _norm_rule(cfg.model.norm, global_batch,
                                                                 per_process, world_size))


def _norm_rule(norm: str, global_batch: int, per_process: int, world_size: int) -> str:
    """model.norm in words: whose images the statistics cover on this world size."""
    if norm == "instance":
        return "InstanceNorm (each image alone)"
    if world_size == 1:
        return f"BatchNorm over the batch ({global_batch} images)"
    if norm == "batch":
        return f"BatchNorm over the global batch ({global_batch} images, cross-process)"
    return (f"BatchNorm per process ({per_process} images each; model.norm=batch_local, "
            f"not the global batch of {global_batch})")
