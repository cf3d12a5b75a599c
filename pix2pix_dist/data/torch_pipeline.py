"""Fallback backend: random access into the tar shards + torchvision JPEG decode, in DataLoader
workers that live as long as the loader.

Same samples per rank as DALI (sampling.py), same augmentation semantics, uint8 (B,3,S,S)
batches handed to the same Lab step. Each sample's JPEG is located once (reading.locate_samples:
the index files, else the tar headers), so an epoch's order is a full shuffle of the rank's part
(validation: the stored order; `data.shuffle_buffer` is DALI's) and batch k of an epoch is slots
[k*B, (k+1)*B) of that order. A worker reads, decodes and augments one whole batch and hands it
over as one tensor (one shared-memory transfer per batch, not one per sample). The workers start
once and are fed an endless sequence of (epoch, batch) requests, so an epoch boundary costs
nothing; a jump to another epoch (resume, set_epoch) or an epoch left unfinished starts them
afresh.

Decoding: on a CPU device the workers decode with torchvision and augment. On a CUDA device they
pass the JPEG bytes and the main process decodes the whole batch with nvJPEG
(`decode_jpeg(device="cuda")`), then augments on the GPU (CUDA must not be used in forked workers).

Randomness is a function of (seed, epoch, rank, sample key), not of worker timing: an epoch is
reproducible, and validation is identical on every pass. A corrupt sample is skipped, counted
and reported with its shard and key, and its batch is topped up in the main process from the
epoch's reserve: the slots after the epoch's last batch, then the epoch's order again (repeats),
so batch counts stay equal across ranks; a whole pass without a decodable sample is an error.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from ..config import DataConfig
from ..errors import DataError, warn
from ..imageio import first_line
from .geometry import Augment, decode
from .lab import uint8_to_lab
from .reading import DamagedShard, Located, locate_samples
from .sampling import derive_seed, rank_range
from .shards_index import ShardSet


class _Samples:
    """The rank's located samples: each epoch's order, and one sample read, decoded, augmented."""

    def __init__(self, located: list[Located], augment: Augment, *, decode_here: bool,
                 seed: int, rank: int) -> None:
        self.located, self.augment, self.decode_here = located, augment, decode_here
        self.seed, self.rank = seed, rank
        self._files: dict[Path, int] = {}  # descriptors, opened lazily in each process

    @functools.lru_cache(maxsize=2)  # noqa: B019 -- one object per loader, two epochs at most
    def order(self, epoch: int) -> list[int]:
        n = len(self.located)
        if not self.augment.train:
            return list(range(n))
        return random.Random(derive_seed(self.seed, epoch, self.rank)).sample(range(n), n)

    def load(self, position: int, epoch: int) -> tuple[str, str, torch.Tensor | str]:
        """("ok", name, uint8 (3,S,S), or the JPEG bytes on CUDA) or ("bad", name, reason);
        raises DamagedShard when the tar is shorter than its index."""
        sample = self.located[position]
        if sample.offset < 0:
            return "bad", sample.name, "no .jpg member"
        data = self._read(sample)
        if not self.decode_here:
            return "ok", sample.name, data
        try:
            img = decode(data)
        except RuntimeError as exc:
            return "bad", sample.name, first_line(exc)
        return "ok", sample.name, self.augment(img, sample_rng(self.seed, epoch, self.rank, sample.key))

    def _read(self, sample: Located) -> torch.Tensor:
        try:
            fd = self._files.get(sample.tar)
            if fd is None:
                fd = self._files[sample.tar] = os.open(sample.tar, os.O_RDONLY)
            data = os.pread(fd, sample.size, sample.offset)
        except OSError as exc:
            raise DamagedShard(sample.tar, exc) from None
        if len(data) != sample.size:
            raise DamagedShard(sample.tar, OSError("shorter than its index"))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class _Batches(Dataset):
    """Item (epoch, k): batch k of `epoch`, loaded in a worker: ((L, ab) of the g good samples,
    converted here, or a list of their JPEG byte tensors on CUDA; their names; the bad ones as
    (name, reason); the damaged shard's message, or "")."""

    def __init__(self, samples: _Samples, batch: int) -> None:
        self.samples, self.batch = samples, batch

    def __getitem__(self, index: tuple[int, int]
                    ) -> tuple[torch.Tensor | list[torch.Tensor], list[str], list[tuple[str, str]], str]:
        epoch, k = index
        good, names, bad = [], [], []
        try:
            for position in self.samples.order(epoch)[k * self.batch:(k + 1) * self.batch]:
                status, name, payload = self.samples.load(position, epoch)
                if status == "ok":
                    good.append(payload)
                    names.append(name)
                else:
                    bad.append((name, payload))
        except DamagedShard as exc:
            # Handed over as an item: raised in a DataLoader worker, it would reach the user
            # wrapped in that worker's traceback.
            return [], [], [], str(exc)
        if not self.samples.decode_here:
            return good, names, bad, ""
        # Lab here, in the worker: on a CPU it is as costly as decoding (Kornia, ~7 ms per
        # 128x128 image on one core), and the main process has the training step to run.
        size = self.samples.augment.crop_size
        rgb = torch.stack(good) if good else torch.empty(0, 3, size, size, dtype=torch.uint8)
        return uint8_to_lab(rgb), names, bad, ""


def sample_rng(seed: int, epoch: int, rank: int, key: str) -> random.Random:
    """Augmentation randomness of one sample in one epoch (validation draws nothing from it)."""
    return random.Random(derive_seed(seed, epoch, rank, zlib.crc32(key.encode())))


def _as_is(item: object) -> object:
    return item  # no default_convert: it would turn the (L, ab) tuple into a list


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism; avoid oversubscribing cores


class TorchBatches:
    """This rank's batches from long-lived DataLoader workers; see the module docstring."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, *, batch_size: int, train: bool,
                 rank: int, world_size: int, device: torch.device, seed: int) -> None:
        self.shards, self.cfg, self.rank, self.device, self.seed = shards, cfg, rank, device, seed
        self.batch_size = batch_size
        self.augment = Augment(cfg.crop_size, cfg.load_size, train, cfg.flip,
                               cfg.random_resized_crop, cfg.rrc_min_scale, cfg.resize)
        self.gpu_decode = device.type == "cuda"
        try:
            located = locate_samples(shards, *rank_range(shards.total, world_size, rank))
        except DamagedShard as exc:
            raise self._damaged(exc) from None
        self.samples = _Samples(located, self.augment, decode_here=not self.gpu_decode, seed=seed, rank=rank)
        self.skipped = 0
        self._stream: Iterator | None = None
        self._next: tuple[int, int, int] | None = None  # (epoch, batch, count) the stream gives next

    def batches(self, epoch: int, count: int, with_keys: bool = False
                ) -> Iterator[tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], list[str] | None]]:
        """`count` batches of epoch `epoch`: (uint8 (B,3,S,S) on the device, or on a CPU device
        the (L, ab) pair already converted by the workers; keys or None)."""
        if self._stream is None or self._next != (epoch, 0, count):
            self._start(epoch, count)
        reserve = self._reserve(epoch, count)
        for k in range(count):
            self._next = None  # until this batch is handed over: a stream left mid-epoch restarts
            images, names, bad, damaged = next(self._stream)
            if damaged:
                raise self._damaged(damaged)
            for name, reason in bad:
                self._skip(name, reason)
            if self.gpu_decode:
                items = self._decode_on_device(list(zip(names, images)), epoch)
                while len(items) < self.batch_size:
                    items += self._top_up(reserve, self.batch_size - len(items), epoch)
                names = [name for name, _ in items]
                batch = torch.stack([img for _, img in items])
            else:
                batch = images
                while len(names) < self.batch_size:
                    extra = self._top_up(reserve, self.batch_size - len(names), epoch)
                    names = names + [name for name, _ in extra]
                    batch = tuple(map(torch.cat, zip(batch, uint8_to_lab(torch.stack([img for _, img in extra])))))
            self._next = (epoch, k + 1, count) if k + 1 < count else (epoch + 1, 0, count)
            yield batch, names if with_keys else None

    def _start(self, epoch: int, count: int) -> None:
        self._stream = None  # the previous workers exit before new ones start
        workers = max(1, min(self.cfg.num_threads, count))
        # A generator of its own: by default a DataLoader iterator draws its workers' base seed
        # from the global torch RNG, which a resumed run restores mid-epoch, so that draw would
        # shift G's dropout noise (our randomness comes from derive_seed, not from that seed).
        # The workers' requests: (epoch, k) for k < count, epoch after epoch from `epoch`.
        requests = ((e, k) for e in itertools.count(epoch) for k in range(count))
        loader = DataLoader(_Batches(self.samples, self.batch_size), batch_size=None,
                            sampler=requests, num_workers=workers, collate_fn=_as_is,
                            prefetch_factor=max(2, self.cfg.prefetch), worker_init_fn=_worker_init,
                            pin_memory=self.gpu_decode, generator=torch.Generator().manual_seed(self.seed))
        self._stream = iter(loader)

    def _reserve(self, epoch: int, count: int) -> Iterator[int]:
        """Positions that top up batches short of good samples: the slots after the epoch's
        last batch, then the epoch's whole order, again and again."""
        order = self.samples.order(epoch)
        yield from order[count * self.batch_size:]
        while True:
            yield from order

    def _top_up(self, reserve: Iterator[int], n: int, epoch: int) -> list[tuple[str, torch.Tensor]]:
        """Up to `n` good samples from the reserve, loaded here (the rare path); DataError once a
        whole pass over the rank's part gave nothing decodable."""
        items: list[tuple[str, torch.Tensor]] = []
        for _ in range(len(self.samples.located)):
            try:
                status, name, payload = self.samples.load(next(reserve), epoch)
            except DamagedShard as exc:
                raise self._damaged(exc) from None
            if status != "ok":
                self._skip(name, payload)
                continue
            items += self._decode_on_device([(name, payload)], epoch) if self.gpu_decode else [(name, payload)]
            if len(items) == n:
                return items
        if not items:
            raise DataError(f"rank {self.rank}: too few decodable {self.shards.split} samples "
                            f"in {self.shards.root} for batches of {self.batch_size} "
                            f"({self.skipped} corrupt samples skipped)")
        return items

    def _damaged(self, exc: DamagedShard | str) -> DataError:
        return DataError(f"rank {self.rank}: shard {exc} in {self.shards.root}; rewrite the "
                         f"shards with `make shards`")

    def _skip(self, name: str, reason: str) -> None:
        self.skipped += 1
        shard, _, key = name.partition("/")
        warn(f"skipped corrupt sample {key} in shard {shard} of {self.shards.root}: {reason}")

    def _decode_on_device(self, items: list[tuple[str, torch.Tensor]], epoch: int
                          ) -> list[tuple[str, torch.Tensor]]:
        """nvJPEG-decode JPEG bytes as one batch and augment on the GPU; corrupt ones are dropped
        (the caller tops the batch up). Per-sample decode only after a batch call fails."""
        data = [d for _, d in items]  # decode_jpeg takes host bytes even for device='cuda'
        try:
            images: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            images = []
            for (name, _), one in zip(items, data):
                try:
                    images.append(decode(one, self.device))
                except RuntimeError as exc:
                    self._skip(name, first_line(exc))
                    images.append(None)
        return [(name, self.augment(img, sample_rng(self.seed, epoch, self.rank, name.partition("/")[2])))
                for (name, _), img in zip(items, images) if img is not None]
