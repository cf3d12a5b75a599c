"""The input pipeline's entry point: pick a backend, size the epoch, turn uint8 RGB into Lab."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import DataConfig
from ..errors import DataError, warn
from .lab import one_cpu_thread, uint8_to_lab
from .sampling import batches_per_epoch
from .shards_index import ShardSet

if TYPE_CHECKING:
    from .dali_pipeline import DaliBatches
    from .torch_pipeline import TorchBatches


class Loader:
    """Batches of (L, ab) for one rank: L (B,1,S,S) = L/50-1, ab (B,2,S,S) = ab/110, float32,
    contiguous, on the device. len() is the same on every rank. Each iter() is one epoch; it
    uses the epoch given to set_epoch(), else the one after the previous iter()."""

    def __init__(self, impl: TorchBatches | DaliBatches, backend: str, num_batches: int) -> None:
        self._impl, self.backend, self._num_batches = impl, backend, num_batches
        self._epoch = 0

    def __len__(self) -> int:
        return self._num_batches

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far, counted each time one is met (always 0 for DALI,
        which raises DataError instead)."""
        return self._impl.skipped

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for L, ab, _ in self._epoch_batches(with_keys=False):
            yield L, ab

    def iter_with_keys(self) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        """Like iter(), plus each sample's `<shard file>/<key>` (tests and debugging; for DALI
        this rebuilds the pipeline with an extra output)."""
        yield from self._epoch_batches(with_keys=True)

    def _epoch_batches(self, with_keys: bool) -> Iterator[tuple[Tensor, Tensor, list[str] | None]]:
        epoch, self._epoch = self._epoch, self._epoch + 1
        for batch, keys in self._impl.batches(epoch, self._num_batches, with_keys):
            if not isinstance(batch, tuple):  # uint8 RGB; (L, ab) where converted (torch_pipeline.py)
                # On a CPU with one intra-op thread: the backend's own threads already fill the
                # cores (DALI's CPU mode was 0.54x the tutorial's loader with two).
                with one_cpu_thread(batch.device):
                    batch = uint8_to_lab(batch)
            L, ab = batch
            yield L, ab, keys


def _pick_backend(requested: str, announce: bool) -> str:
    """The backend to use; with `announce`, say so when "auto" falls back to torch."""
    if requested == "torch":
        return "torch"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        if requested == "dali":
            raise DataError("data.backend=dali but NVIDIA DALI is not installed; "
                            "pip install nvidia-dali-cuda130 (or -cuda120), "
                            "or set data.backend=torch") from None
        if announce:
            warn("NVIDIA DALI is not installed; using the torch input pipeline "
                 "(webdataset + DataLoader), which is slower")
        return "torch"
    return "dali"


def build_loader(shards: ShardSet, cfg: DataConfig, *, batch_size: int, rank: int,
                 world_size: int, device: torch.device, seed: int, train: bool | None = None,
                 exact_epochs: bool = False) -> Loader:
    """The loader of the split `shards` (from find_shards) for process `rank` of `world_size`,
    `batch_size` images per batch (the resolved per-process batch: Recipe.batch_per_process
    in training; cfg.batch_size is a setting of the recipe, not read here).

    `train` (default: a train split) turns on augmentation (resize shorter side to
    load_size + random crop, or a random-resized crop; random flip) and shuffling; otherwise
    images are resized to crop_size on the shorter side and centre-cropped, in a fixed order,
    so every pass gives the same batches. With `exact_epochs`, epoch k's order depends only on
    (seed, k, rank) on every backend (DALI then rebuilds its pipeline each epoch), so a resumed
    run replays exactly. Raises DataError when the split has too few samples.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    device = torch.device(device)
    train = shards.split == "train" if train is None else train
    num_batches = batches_per_epoch(shards.total, world_size, batch_size,
                                    where=f"the {shards.split} split of {shards.root}")
    # Said once per run without a flag to remember it: by rank 0, for the train split (a run
    # builds its train loader once, its val loader possibly many times).
    backend = _pick_backend(cfg.backend, announce=rank == 0 and shards.split == "train")
    kwargs = dict(batch_size=batch_size, train=train, rank=rank, world_size=world_size,
                  device=device, seed=seed)
    if backend == "dali":
        from .dali_pipeline import DaliBatches
        return Loader(DaliBatches(shards, cfg, exact_epochs=exact_epochs, **kwargs), "dali", num_batches)
    from .torch_pipeline import TorchBatches
    return Loader(TorchBatches(shards, cfg, **kwargs), "torch", num_batches)
