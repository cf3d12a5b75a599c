"""The training loop, top to bottom in the order it runs: build, prepare, resume, loop, save.

One iteration is one batch per process: a D step, then a G step (pix2pix's order). Progress is
counted in iterations (`step`), which also fixes the position in the data stream, so a resumed
run continues with exactly the batches it would have seen.
The step itself (and the DDP design for the BatchNorm discriminator) is in gan_step.py; what a
checkpoint holds and how it is restored, in checkpoints.py. Failure handling (locks, signals,
one-line errors per rank): docs/design.md, "Failures, signals and locks".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import device_defaults
from .atomic import atomic_write
from .checkpoints import CheckpointManager, checkpoint_root
from .config import Config, parse_command
from .data import build_loader, lab_to_rgb
from .data.shards_index import Splits, find_splits
from .errors import UserError, rank_and_world, run_main, warn
from .evaluation import TrainingEval
from .export import generator_meta
from .gan_step import GanStep, build_networks
from .locking import FolderLock, LockError
from .lifetime import end_at_once_on_ctrl_c
from .ranks import PARENT_DIED, agree, die_with_parent, reach_rendezvous
from .recipe import Recipe, resolve_recipe
from .resnet_unet import load_encoder_weights
from .inference import inference_copy, predict_ab
from .tracking import RunTracker, check_tracker, tracker_for


@dataclass
class TrainResult:
    step: int
    """Iterations done when the run ended."""
    generator: nn.Module
    """The trained generator (unwrapped, on the training device)."""
    discriminator: nn.Module


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Collects SIGTERM, SIGINT and the parent-death signal in the yielded list, checked between
    steps, so the run saves and stops at the next step boundary. Only a second Ctrl-C stops at
    once: SIGTERM often arrives twice (SLURM signals every process of the step, and the launcher
    passes its own SIGTERM on), and the parent-death signal once per launcher thread."""
    received: list[int] = []
    previous: dict[int, Any] = {}

    def handle(signum: int, frame: object) -> None:
        received.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signum, previous[signum])

    for sig in (signal.SIGTERM, signal.SIGINT, PARENT_DIED):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGHUP under nohup
            previous[sig] = signal.signal(sig, handle)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def make_accelerator(cfg: Config):
    """The Accelerator for `cfg`, whose train settings are resolved (device_defaults.resolve)."""
    from accelerate import Accelerator

    precision = cfg.train.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        # Accelerate refuses fp16 on a CPU; bf16 autocast runs there (ask for it explicitly).
        if rank_and_world()[0] == 0:  # before the Accelerator exists: the launcher's rank
            warn("no CUDA device; train.mixed_precision=fp16 -> no (bf16 runs on a CPU)")
        precision = "no"
    # cpu=True on a machine without CUDA: only then does Accelerate join the processes that
    # torchrun / `accelerate launch` started into one gloo group (otherwise each trains alone).
    return Accelerator(mixed_precision=precision, log_with=tracker_for(cfg),
                       project_dir=cfg.run_dir, cpu=not torch.cuda.is_available())


def batch_stream(loader, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches starting at iteration `start_step` of the epoch sequence.

    Resuming mid-epoch replays that epoch's order (seeded per epoch) and skips the batches
    already used; skipping decodes them, a cost of at most one epoch's input pipeline time."""
    epoch, skip = divmod(start_step, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from itertools.islice(loader, skip, None)
        skip, epoch = 0, epoch + 1


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, accelerator) -> Iterator[None]:
    """Global rank 0 holds the run folder's lock for the whole run (one training per folder, also
    across nodes on shared storage) and checks that it can write there, before data or models
    load; every rank raises the same one-line error otherwise."""
    lock, error = FolderLock(run_dir, "training"), None
    if accelerator.is_main_process:
        try:
            lock.acquire()  # creates the folder, and fails on a read-only one
            checkpoint_root(run_dir).mkdir(exist_ok=True)
            with tempfile.TemporaryFile(dir=checkpoint_root(run_dir)):
                pass
        except LockError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot write to the run folder {run_dir}: {exc.strerror or exc}"
    try:
        agree(error, UserError)
        yield
    finally:
        lock.release()


def train(cfg: Config) -> TrainResult:
    cfg = device_defaults.resolve(cfg)  # `auto` speed settings -> this device's fastest
    check_tracker(cfg.log.tracker)
    die_with_parent()  # a SIGKILLed launcher must not leave this rank training on its own
    reach_rendezvous()  # nor waiting for a rendezvous that no longer exists
    accelerator = make_accelerator(cfg)
    # The manifest, read once: counts the train split (no image is read) before any folder is
    # made, and refuses a listed shard that is missing or truncated, val included.
    shards = find_splits(cfg.data.shards)
    recipe = resolve_recipe(cfg, accelerator.num_processes, shards["train"].total)
    with claim_run_dir(Path(cfg.run_dir), accelerator):
        return _train(cfg, accelerator, recipe, shards)


def _train(cfg: Config, accelerator, recipe: Recipe, shards: Splits) -> TrainResult:
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process
    run_dir = Path(cfg.run_dir)
    say = accelerator.print

    torch.backends.cudnn.benchmark = not cfg.train.deterministic
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    from accelerate.utils import set_seed
    set_seed(cfg.train.seed)  # identical initial weights on every rank

    # --- data -----------------------------------------------------------------------------
    loader = build_loader(shards["train"], cfg.data, batch_size=recipe.batch_per_process,
                          rank=rank, world_size=world, device=device, seed=cfg.train.seed,
                          exact_epochs=cfg.train.deterministic)
    eval_shards = sample_L = sample_ab = None
    if main_process:  # the sample grid's images: deterministic (resize + centre crop)
        eval_shards = shards.for_eval()
        sample_L, sample_ab = next(iter(build_loader(
            eval_shards, cfg.data, batch_size=min(cfg.log.sample_count, eval_shards.total), rank=0,
            world_size=1, device=device, seed=cfg.train.seed, train=False)))

    # --- models, optimizers, resume ---------------------------------------------------------
    nets = build_networks(cfg, accelerator)
    G_raw, D_raw = nets.G_raw, nets.D_raw
    step_fn = GanStep(accelerator, nets, cfg.optim, d_concat=cfg.train.d_concat)
    export_meta = functools.partial(generator_meta, cfg)  # what each export records, by step
    ckpt = CheckpointManager(run_dir, nets, accelerator, keep=cfg.ckpt.keep,
                             # The encoder's starting weights do not change what the
                             # checkpoint's weights mean: a resume may name another source.
                             model={k: v for k, v in dataclasses.asdict(cfg.model).items()
                                    if k != "encoder_weights"},
                             recipe=recipe, export_meta=export_meta)
    start_step, nonfinite = ckpt.resume(cfg.ckpt.resume, seed=cfg.train.seed)
    if ckpt.resumed_from is None:  # a resumed run has its weights: no download, no file read
        load_encoder_weights(G_raw, cfg.model.encoder_weights, accelerator)

    if start_step >= recipe.steps:
        say(f"already trained {start_step} of {recipe.steps} steps in {run_dir}; nothing to "
            f"do (raise train.epochs or train.steps to go on)")
        return TrainResult(start_step, G_raw, D_raw)
    if main_process:
        cfg.save(run_dir / "config.json")
        write_status(run_dir, "running", start_step)  # an earlier run's `finished` no longer holds
    tracker = RunTracker(accelerator, cfg, run_dir, resume_step=start_step, recipe=recipe)
    if ckpt.resumed_from is not None:
        say(f"resumed from {ckpt.resumed_from} at step {start_step}")
    say(f"training on {world} process(es), {device.type}, input backend {loader.backend}, "
        f"run folder {run_dir}")
    say(recipe.describe())

    evaluator = (TrainingEval(eval_shards, cfg.eval.count, export_meta(0), device)
                 if main_process and cfg.eval.every else None)

    # --- the loop ---------------------------------------------------------------------------
    data = batch_stream(loader, start_step)
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    # A bar on a terminal; elsewhere (logs, CI) the periodic status line is enough.
    progress = tqdm(total=recipe.steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=not (main_process and sys.stderr.isatty()))
    step, stopped = start_step, False
    tick_start, data_wait, tick_from = time.perf_counter(), 0.0, step
    with stop_signals() as received:
        while step < recipe.steps:
            warmup = recipe.in_warmup(step)
            if recipe.warmup_steps and step in (start_step, recipe.warmup_steps):
                say(f"phase 1: L1 warm-up of the generator alone, to step {recipe.warmup_steps}"
                    if warmup else f"phase 2: GAN, steps {recipe.warmup_steps + 1}-{recipe.steps}")
            if step == recipe.warmup_steps > 0:  # also when resumed exactly here
                step_fn.restart_g_optimizer()
            lr = recipe.lr_at(step)
            step_fn.set_lr(lr, warmup)

            t0 = time.perf_counter()
            L, ab = next(data)
            data_wait += time.perf_counter() - t0
            # The host reads the step's flags only at some steps (docs/design.md, "The training
            # step on the GPU"); in between, skipped steps are counted on the device.
            read = _reads_flags(step + 1, recipe.steps, cfg)
            result = step_fn(L, ab, stop=bool(received) if read else None, warmup=warmup)

            step += 1
            for key, value in result.losses().items():  # zero for a skipped step
                sums[key] += value
            sums["n"] += result.ok
            if result.skipped:
                nonfinite += result.skipped
                ckpt.check_finite(step)  # NaN weights never heal: stop now, not at the limit
                if main_process:
                    warn(f"non-finite loss in {result.skipped} step(s) up to step {step}; "
                         f"update skipped ({nonfinite} so far)")
                if nonfinite >= cfg.train.max_nonfinite:
                    raise UserError(
                        f"{nonfinite} steps had non-finite losses (train.max_nonfinite="
                        f"{cfg.train.max_nonfinite}); stopping. Try train.mixed_precision=bf16 or "
                        f"a lower optim.lr: {ckpt.advice()}", all_ranks=True)

            progress.update(1)
            if (step % cfg.log.every == 0 or step in (recipe.steps, recipe.warmup_steps)
                    or result.stop):  # a phase's losses are never averaged with the next's
                scalars = _mean_losses(accelerator, sums)  # waits for the device: time after it
                elapsed = time.perf_counter() - tick_start
                scalars.update({
                    "lr": lr, "epoch": step / len(loader), "nonfinite_steps": nonfinite,
                    "phase": 1 if warmup else 2,  # 1: L1 warm-up, 2: GAN
                    "data/skipped_samples": loader.skipped,
                    "perf/images_per_s": (step - tick_from) * recipe.global_batch / elapsed,
                    "perf/data_wait_frac": data_wait / elapsed,
                })
                if device.type == "cuda":
                    scalars["perf/gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                tracker.log_scalars(step, scalars)
                _show(progress, say, step, recipe.steps, scalars)
                sums.clear()
                tick_start, data_wait, tick_from = time.perf_counter(), 0.0, step
            if main_process and (step % cfg.log.sample_every == 0 or step == recipe.steps):
                # In the recipe's inference norm mode, on a copy (docs/design.md, "Evaluation
                # and inference").
                copy = inference_copy(G_raw, export_meta(step)["model"])
                fake = predict_ab(copy, sample_L, cfg.eval.norm_mode, range(len(sample_L)))
                tracker.log_grid(step, lab_to_rgb(sample_L, torch.zeros_like(sample_ab)),
                                 lab_to_rgb(sample_L, fake), lab_to_rgb(sample_L, sample_ab))
            if evaluator is not None and (step % cfg.eval.every == 0 or step == recipe.steps):
                tracker.log_scalars(step, evaluator(G_raw))
            if stopped := result.stop:
                break
            if step % cfg.ckpt.every == 0 and step < recipe.steps:
                ckpt.save(step, nonfinite)

        path = ckpt.save(step, nonfinite)
    progress.close()
    tracker.close()
    if main_process:
        write_status(run_dir, "stopped" if stopped else "finished", step)
    if stopped:
        say(f"stopped by signal at step {step}; checkpoint {path}. "
            f"Run the same command again to resume (ckpt.resume=auto).")
    else:
        say(f"done: {step} steps; checkpoint {path}; generator {run_dir / 'generator.safetensors'}")
    return TrainResult(step, G_raw, D_raw)


def write_status(run_dir: Path, state: str, step: int) -> None:
    """run_dir/status.json, for wrappers (e.g. launch/slurm.sbatch, which requeues on `stopped`):
    `running` from the start of the loop (and after a crash or an error), then `stopped` (by a
    signal: resume it) or `finished`."""
    atomic_write(run_dir / "status.json", json.dumps({"state": state, "step": step}) + "\n")


def _mean_losses(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average the interval's summed losses over its good steps and over all ranks.

    Every rank holds the same keys (a step's update is skipped on all ranks or none), so one
    all-reduce of the stacked sums is enough."""
    keys = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="sum")
    values = dict(zip(keys, totals.tolist()))
    n = values.pop("n")
    return {k: v / n for k, v in values.items()} if n else {}


def _reads_flags(step: int, last: int, cfg: Config) -> bool:
    """Whether the host reads the step's flags after iteration `step` (1-based): every
    train.sync_every steps, and at log points, checkpoints and the `last` step, so that what they
    record is exact."""
    return step == last or any(
        step % every == 0 for every in (cfg.train.sync_every, cfg.log.every, cfg.ckpt.every))


def _show(progress, say, step: int, total: int, scalars: dict[str, float]) -> None:
    gan = (f"D {scalars.get('loss/D_real', math.nan) + scalars.get('loss/D_fake', math.nan):.3f} "
           f"G {scalars.get('loss/G_GAN', math.nan):.3f} " if scalars.get("phase") == 2 else "warm-up ")
    brief = (f"{gan}L1 {scalars.get('loss/G_L1', math.nan):.4f} "
             f"{scalars['perf/images_per_s']:.1f} img/s data {100 * scalars['perf/data_wait_frac']:.0f}%")
    if progress.disable:
        say(f"step {step}/{total}  {brief}")
    else:
        progress.set_postfix_str(brief, refresh=False)


def main(argv: list[str] | None = None) -> int:
    """Every failure a user can act on ends as one line (`error: [rank R] ...` from the rank that
    hit it when several run), exit code 2; errors every rank agreed on are printed by rank 0."""
    command, argv = argv is None, sys.argv[1:] if argv is None else argv

    def body() -> None:
        cfg, dry_run = parse_command(argv)
        if dry_run:  # no Accelerator: the launcher's WORLD_SIZE is the world size
            rank, world = rank_and_world()
            recipe = resolve_recipe(cfg, world, find_splits(cfg.data.shards)["train"].total)
            if rank == 0:
                print(f"{recipe.describe()}\ndry run: nothing was built or trained")
        else:
            train(cfg)

    try:
        return run_main(body)
    finally:
        if command:  # this process's command (not a call from a test): teardown follows
            end_at_once_on_ctrl_c()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
