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
import math
import random
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from webdataset import tariterators

from ..config import DataConfig
from ..imageio import first_line
from .errors import DataError
from .sampling import derive_seed, rank_range
from .shards_index import ShardSet


@dataclass(frozen=True)
class Augment:
    """pix2pix augmentation for one sample, on CPU or CUDA uint8 (3,H,W) tensors, with the same
    geometry as dali_pipeline.py: training resizes (`resize` below) to load_size and takes a
    random S x S crop (or a random-resized crop), then flips; validation resizes to S and takes
    the centre S x S (all of a `square` image)."""

    crop_size: int
    load_size: int
    train: bool
    flip: bool
    random_resized_crop: bool
    rrc_min_scale: float
    resize: str = "shorter_side"

    def __call__(self, img: torch.Tensor, rng: random.Random) -> torch.Tensor:
        size = self.crop_size
        if not self.train:  # the whole image (square) or its centre, at S x S
            return TF.center_crop(resize(img, size, self.resize), [size, size]).contiguous()
        if self.random_resized_crop:
            top, left, h, w = self._rrc_window(img.shape[-2], img.shape[-1], rng)
            img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        else:
            img = resize(img, self.load_size, self.resize)
            top = rng.randint(0, img.shape[-2] - size)
            left = rng.randint(0, img.shape[-1] - size)
            img = TF.crop(img, top, left, size, size)
        if self.flip and rng.random() < 0.5:
            img = TF.horizontal_flip(img)
        return img.contiguous()

    def _rrc_window(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop.get_params with our generator (and DALI's defaults).
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(self.rrc_min_scale, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side


def resize(img: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """`shorter_side`: the shorter side to `side`, aspect ratio kept; `square`: the whole image to
    side x side. Bicubic, antialiased (PIL's BICUBIC), as pix2pix's and the tutorial's resize."""
    size = [side, side] if mode == "square" else [side]
    return TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def decode(data: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """JPEG bytes (uint8 1-D) -> uint8 (3,H,W) RGB; raises RuntimeError on a corrupt file."""
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


@dataclass(frozen=True)
class _Segment:
    tar: Path
    start: int
    stop: int
    """Sample numbers [start, stop) inside the tar."""


class DamagedShard(Exception):
    """A tar that cannot be read to its end (truncated, overwritten): no sample can be trusted."""

    def __init__(self, tar: Path, exc: BaseException) -> None:
        # webdataset appends the open file and the url to the exception's args: keep the reason.
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        super().__init__(f"{tar.name} is damaged ({reason})")


def _read(segments: list[_Segment]) -> Iterator[tuple[str, str, bytes | None]]:
    """(shard file name, key, jpg bytes or None when the sample has no .jpg) per sample.
    Raises DamagedShard for a tar that cannot be read."""
    for seg in segments:
        samples = tariterators.tarfile_samples([{"url": str(seg.tar)}])
        try:
            for i, sample in enumerate(samples):
                if i >= seg.stop:
                    break
                if i >= seg.start:
                    yield seg.tar.name, sample["__key__"], sample.get("jpg")
        except (tarfile.TarError, OSError) as exc:
            raise DamagedShard(seg.tar, exc) from None


def _segments(shards: ShardSet, start: int, stop: int) -> list[_Segment]:
    """Split positions [start, stop) of the concatenated split into per-tar pieces."""
    out, offset = [], 0
    for shard in shards.shards:
        lo, hi = max(start, offset), min(stop, offset + shard.samples)
        if lo < hi:
            out.append(_Segment(shard.tar, lo - offset, hi - offset))
        offset += shard.samples
    return out


def read_range(shards: ShardSet, start: int, stop: int) -> Iterator[tuple[str, str, bytes | None]]:
    """(shard file name, key, jpg bytes or None) for positions [start, stop) of the split, in
    order; raises DamagedShard for a tar that cannot be read (evaluate reads val this way)."""
    return _read(_segments(shards, start, stop))


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
        segments = _segments(self.shards, self.start + lo, self.start + hi)
        for passes in itertools.count():
            good = 0
            for item in self._one_pass(segments, derive_seed(self.seed, self.epoch, self.rank, worker, passes)):
                good += item[0] == "ok"
                yield item
            if good == 0:
                return

    def _one_pass(self, segments: list[_Segment], seed: int) -> Iterator[tuple[str, str, str, torch.Tensor | str]]:
        train = self.augment.train
        rng = random.Random(seed)
        if train:
            segments = rng.sample(segments, len(segments))
        samples = _read(segments)
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

    def __init__(self, shards: ShardSet, cfg: DataConfig, *, train: bool, rank: int,
                 world_size: int, device: torch.device, seed: int) -> None:
        self.shards, self.cfg, self.rank, self.device, self.seed = shards, cfg, rank, device, seed
        self.start, self.stop = rank_range(shards.total, world_size, rank)
        self.augment = Augment(cfg.crop_size, cfg.load_size, train, cfg.flip,
                               cfg.random_resized_crop, cfg.rrc_min_scale, cfg.resize)
        self.gpu_decode = device.type == "cuda"
        self.skipped = 0

    def batches(self, epoch: int, count: int, with_keys: bool = False
                ) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        """`count` batches of epoch `epoch`: (uint8 (B,3,S,S) on the device, keys or None)."""
        batch = self.cfg.batch_size
        workers = max(1, min(self.cfg.num_threads, self.stop - self.start))
        dataset = _RankSamples(self.shards, self.start, self.stop, self.augment,
                               decode_here=not self.gpu_decode,
                               shuffle_buffer=max(1, self.cfg.shuffle_buffer // workers),
                               seed=self.seed, epoch=epoch, rank=self.rank)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            prefetch_factor=max(2, self.cfg.prefetch * batch // workers),
                            worker_init_fn=_worker_init, pin_memory=self.gpu_decode)
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
                                f"in {self.shards.root} for {count} batches of {self.cfg.batch_size} "
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
        warnings.warn(f"skipped corrupt sample {key} in shard {shard} of {self.shards.root}: {reason}",
                      RuntimeWarning, stacklevel=4)

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


def find_undecodable(shards: ShardSet, start: int, stop: int) -> str | None:
    """What is wrong with the first bad sample in positions [start, stop) ('<tar>/<key> does
    not decode', '<tar> is damaged (...)'), or None. Names the culprit when DALI fails."""
    try:
        for shard, key, jpg in read_range(shards, start, stop):
            try:
                if jpg is None:
                    raise RuntimeError("no .jpg")
                decode(torch.frombuffer(bytearray(jpg), dtype=torch.uint8))
            except RuntimeError:
                return f"{shard}/{key} does not decode"
    except DamagedShard as exc:
        return str(exc)
    return None
