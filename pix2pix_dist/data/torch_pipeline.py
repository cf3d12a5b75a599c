"""Fallback backend: webdataset tar streaming in DataLoader workers + torchvision JPEG decode.

Same samples per rank as DALI (sampling.py), same augmentation semantics, uint8 (B,3,S,S)
batches handed to the same Lab step. Each worker streams a contiguous slice of its rank's part
(so it opens only the tars it needs), shuffles tar order and a buffer for training, and yields
one sample at a time; the main process forms batches, so batches are full and counted exactly.

Decoding: on a CPU device the workers decode with torchvision and augment. On a CUDA device they
pass the JPEG bytes and the main process decodes the whole batch with nvJPEG
(`decode_jpeg(device="cuda")`), then augments on the GPU (CUDA must not be used in forked workers).

Randomness is a function of (seed, epoch, rank, sample key), not of worker timing: an epoch is
reproducible, and validation is identical on every pass. A corrupt sample is skipped, counted
and reported with its shard and key; the worker streams repeat their slice when skips leave the
epoch short, so batch counts stay equal across ranks.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from ..config import DataConfig
from ..errors import warn
from ..imageio import first_line
from .errors import DataError
from .geometry import Augment, decode
from .reading import DamagedShard, Segment, read_segments, split_segments
from .sampling import derive_seed, rank_range
from .shards_index import ShardSet


class _RankSamples(IterableDataset):
    """One epoch's samples of one rank, split between DataLoader workers.

    Yields ("ok", shard, key, uint8 image or jpg bytes) or ("bad", shard, key, reason). A worker
    repeats its slice (reshuffled) until the consumer stops, or stops when a whole pass gave
    nothing usable, so a few corrupt samples cannot shorten an epoch and all-corrupt data ends.
    """

    def __init__(self, shards: ShardSet, start: int, stop: int, augment: Augment, *,
                 decode_here: bool, shuffle_buffer: int, seed: int, epoch: int, rank: int) -> None:
        self.shards, self.start, self.stop, self.augment = shards, start, stop, augment
        self.decode_here, self.shuffle_buffer = decode_here, shuffle_buffer
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __iter__(self) -> Iterator[tuple[str, str, str, torch.Tensor | str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        lo, hi = rank_range(self.stop - self.start, workers, worker)  # the rank's rule, again
        segments = split_segments(self.shards, self.start + lo, self.start + hi)
        for passes in itertools.count():
            good = 0
            for item in self._one_pass(segments, derive_seed(self.seed, self.epoch, self.rank, worker, passes)):
                good += item[0] == "ok"
                yield item
            if good == 0:
                return

    def _one_pass(self, segments: list[Segment], seed: int) -> Iterator[tuple[str, str, str, torch.Tensor | str]]:
        train = self.augment.train
        rng = random.Random(seed)
        if train:
            segments = rng.sample(segments, len(segments))
        samples = read_segments(segments)
        if train:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        try:
            for shard, key, jpg in samples:
                if jpg is None:
                    yield "bad", shard, key, "no .jpg member"
                    continue
                data = torch.frombuffer(bytearray(jpg), dtype=torch.uint8)
                if not self.decode_here:
                    yield "ok", shard, key, data
                    continue
                try:
                    img = decode(data)
                except RuntimeError as exc:
                    yield "bad", shard, key, first_line(exc)
                    continue
                yield "ok", shard, key, self.augment(img, sample_rng(self.seed, self.epoch, self.rank, key))
        except DamagedShard as exc:
            # Handed over as an item: raised in a DataLoader worker, it would reach the user
            # wrapped in that worker's traceback.
            yield "damaged", "", "", str(exc)


def _buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: hold `size` items, emit a random one as each new one arrives."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def sample_rng(seed: int, epoch: int, rank: int, key: str) -> random.Random:
    """Augmentation randomness of one sample in one epoch (validation draws nothing from it)."""
    return random.Random(derive_seed(seed, epoch, rank, zlib.crc32(key.encode())))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism; avoid oversubscribing cores


class TorchBatches:
    """Per-epoch DataLoader over this rank's part; batches formed in the main process."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, *, batch_size: int, train: bool,
                 rank: int, world_size: int, device: torch.device, seed: int) -> None:
        self.shards, self.cfg, self.rank, self.device, self.seed = shards, cfg, rank, device, seed
        self.batch_size = batch_size
        self.start, self.stop = rank_range(shards.total, world_size, rank)
        self.augment = Augment(cfg.crop_size, cfg.load_size, train, cfg.flip,
                               cfg.random_resized_crop, cfg.rrc_min_scale, cfg.resize)
        self.gpu_decode = device.type == "cuda"
        self.skipped = 0

    def batches(self, epoch: int, count: int, with_keys: bool = False
                ) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        """`count` batches of epoch `epoch`: (uint8 (B,3,S,S) on the device, keys or None)."""
        batch = self.batch_size
        workers = max(1, min(self.cfg.num_threads, self.stop - self.start))
        dataset = _RankSamples(self.shards, self.start, self.stop, self.augment,
                               decode_here=not self.gpu_decode,
                               shuffle_buffer=max(1, self.cfg.shuffle_buffer // workers),
                               seed=self.seed, epoch=epoch, rank=self.rank)
        # A generator of its own: by default each DataLoader iterator draws its workers' base
        # seed from the global torch RNG, which a resumed run restores mid-epoch, so that draw
        # would shift G's dropout noise (our randomness comes from derive_seed, not that seed).
        loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            prefetch_factor=max(2, self.cfg.prefetch * batch // workers),
                            worker_init_fn=_worker_init, pin_memory=self.gpu_decode,
                            generator=torch.Generator().manual_seed(self.seed))
        stream = iter(loader)
        for _ in range(count):
            items: list[tuple[str, torch.Tensor]] = []  # ("shard/key", uint8 (3,S,S)) on device
            while len(items) < batch:
                fresh = self._take(stream, batch - len(items), count)
                items += self._decode_on_device(fresh, epoch) if self.gpu_decode else fresh
            rgb = torch.stack([img for _, img in items]).to(self.device, non_blocking=True)
            yield rgb, [key for key, _ in items] if with_keys else None

    def _take(self, stream: Iterator, n: int, count: int) -> list[tuple[str, torch.Tensor]]:
        """The next `n` usable samples from the workers, counting and reporting bad ones."""
        items = []
        while len(items) < n:
            item = next(stream, None)
            if item is None:
                raise DataError(f"rank {self.rank}: too few decodable {self.shards.split} samples "
                                f"in {self.shards.root} for {count} batches of {self.batch_size} "
                                f"({self.skipped} corrupt samples skipped)")
            status, shard, key, payload = item
            if status == "damaged":
                raise DataError(f"rank {self.rank}: shard {payload} in {self.shards.root}; rewrite the "
                                f"shards with `make shards`")
            if status == "ok":
                items.append((f"{shard}/{key}", payload))
            else:
                self._skip(f"{shard}/{key}", payload)
        return items

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
