"""A recipe resolved for one world size: batches, steps, learning rate and its schedule.

The config states the recipe in global terms (data.global_batch images per optimizer step over
all processes, train.epochs passes over the train split); this module derives what each process
does from the world size and the train split's size, so the same preset is the same run on 1
GPU or 64. See docs/design.md, "Recipes".

A run may start with an L1 warm-up (train.l1_warmup_epochs: the generator alone, its own lr),
then the GAN phase; each phase's schedule runs over its own steps.
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
    """Optimizer steps in the whole run (the warm-up's, then the GAN phase's)."""
    decay_steps: int
    """The GAN phase's last this many steps decay the learning rate linearly to exactly 0."""
    lr: float
    """Peak learning rate of the GAN phase after optim.lr_scaling."""
    lr_rule: str
    """How `lr` was obtained, for the log."""
    norm_rule: str
    """Which images each normalisation layer's statistics cover (model.norm), for the log."""
    warmup_steps: int = 0
    """The first this many steps are the L1 warm-up (generator alone); 0: none."""
    warmup_lr: float = 0.0
    """Peak learning rate of the warm-up (optim.warmup_lr, scaled like `lr`)."""
    warmup_decay_steps: int = 0
    """The warm-up's last this many steps decay its learning rate linearly to exactly 0."""

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    def in_warmup(self, step: int) -> bool:
        """Whether the update that follows `step` completed steps is an L1 warm-up update."""
        return step < self.warmup_steps

    def lr_factor(self, step: int) -> float:
        """Multiplier of its phase's peak lr for the update that follows `step` completed steps
        (0-based). Within a phase of n steps: constant, then over its last `decay` updates
        (decay-1)/decay, ..., 1/decay, 0: the final update of a decaying phase runs at exactly
        0, and a constant one stays at 1."""
        if self.in_warmup(step):
            n, decay, i = self.warmup_steps, self.warmup_decay_steps, step
        else:
            n, decay, i = self.steps - self.warmup_steps, self.decay_steps, step - self.warmup_steps
        return 1.0 if decay <= 0 else min(1.0, max(0.0, (n - 1 - i) / decay))

    def lr_at(self, step: int) -> float:
        """The learning rate of the update that follows `step` completed steps."""
        return (self.warmup_lr if self.in_warmup(step) else self.lr) * self.lr_factor(step)

    def describe(self) -> str:
        """One line with every derived number (the start log line and --dry-run)."""
        gan_steps = self.steps - self.warmup_steps
        schedule = _schedule(gan_steps, self.decay_steps)
        if self.warmup_steps:
            schedule = (f"phase 1: L1 warm-up (generator alone), {self.warmup_steps} steps = "
                        f"{self.warmup_steps / self.steps_per_epoch:g} epochs, lr "
                        f"{self.warmup_lr:.6g}, {_schedule(self.warmup_steps, self.warmup_decay_steps)}"
                        f"; phase 2: GAN, {gan_steps} steps = {gan_steps / self.steps_per_epoch:g} "
                        f"epochs, lr {self.lr:.6g}, {schedule}")
        return (f"recipe: global batch {self.global_batch} = {self.batch_per_process}/process x "
                f"{self.world_size} process(es); {self.steps} steps = {self.epochs:g} epochs of "
                f"{self.train_images} train images ({self.steps_per_epoch} steps/epoch); "
                f"lr {self.lr:.6g} ({self.lr_rule}); "
                f"{schedule}; {self.norm_rule}")


def _schedule(steps: int, decay_steps: int) -> str:
    return (f"constant lr for {steps - decay_steps} steps, then linear decay to 0 over the last "
            f"{decay_steps}" if decay_steps else "constant lr")


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
    t, o = cfg.train, cfg.optim
    gan_steps = t.steps or max(1, round(t.epochs * steps_per_epoch))
    warmup_steps = t.l1_warmup_steps or round(t.l1_warmup_epochs * steps_per_epoch)
    if t.l1_warmup_epochs and not warmup_steps:
        raise ConfigError(f"train.l1_warmup_epochs={t.l1_warmup_epochs:g} is less than one step "
                          f"({steps_per_epoch} steps/epoch); raise it or set it to 0")

    def decay(n: int) -> int:
        return min(n, math.ceil(o.decay_fraction * n - 1e-9))
    ratio = global_batch / o.reference_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[o.lr_scaling]
    lr_rule = f"optim.lr {o.lr:g} at reference batch {o.reference_batch}, lr_scaling={o.lr_scaling}"
    if o.lr_scaling != "none":
        lr_rule += f": x {factor:.4g}"
    return Recipe(world_size, global_batch, per_process, train_images, steps_per_epoch,
                  warmup_steps + gan_steps, decay(gan_steps), o.lr * factor, lr_rule,
                  _norm_rule(cfg.model.norm, global_batch, per_process, world_size),
                  warmup_steps, o.warmup_lr * factor, decay(warmup_steps))


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
