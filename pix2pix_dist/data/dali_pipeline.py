"""DALI backend: webdataset tars -> JPEG decode -> resize/crop/flip -> uint8 (B,3,S,S) in torch.

One pipeline definition serves both machines: with a GPU it decodes with `device="mixed"`
(nvJPEG, partly on the A100/H100 hardware decoder per `hw_decoder_load`) and resizes on the
GPU, and DALI's torch plugin copies each batch device-to-device into a CUDA tensor (no trip
through host memory); without one (`device_id=None`) every operator runs on the CPU, which is
how CI tests it. Output is uint8 CHW, so the hand-over to torch is 1 byte per value and Lab
(fp32) is computed once per batch on the torch side.

Epochs. The reader never stops: with `stick_to_shard=True` each rank cycles through its own
part of the split (see sampling.py), and the loader takes exactly len(loader) batches per epoch
from that stream. The shuffle buffer draws within the rank's part epoch by epoch and its
random state carries on, so consecutive epochs get new orders without rebuilding the pipeline
(a rebuild would refill the buffer and restart prefetching every epoch: on 8 GPUs a COCO
epoch is only a few seconds long). The pipeline is seeded from (seed, epoch, rank) when it is
built: at the first epoch, and again whenever set_epoch() jumps to an epoch other than the next
one (e.g. on resume). So a run is reproducible from a given start epoch, but epoch 5 reached
from epoch 0 is not the same shuffle as epoch 5 started fresh. With `exact_epochs` (the
training loop sets it in deterministic mode) the pipeline is rebuilt every epoch, so each
epoch's order depends only on (seed, epoch, rank) and a resumed run sees exactly the batches of
an uninterrupted one, as with the torch backend, which always reseeds per epoch. Validation
rebuilds its pipeline on every pass, so each pass is identical.

Corrupt JPEGs. DALI's decoder raises a "Critical error in pipeline", naming the sample only when
the header parsed ("Failed to decode sample ...", kept as the reason), and the pipeline is
unusable afterwards; we turn that into a DataError after finding the first undecodable sample
of this rank's part with a CPU scan (slow on big splits, but only on the
error path). The shard writer drops undecodable images, so this means damaged shards.
nvImageCodec also prints its own coloured `[ERROR] [jpeg_parser] ...` line for such a sample;
decoder_log_filter.py keeps it off stderr, so the user sees our one line.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from ..config import DataConfig
from ..errors import DataError
from ..shard_format import split_name
from . import decoder_log_filter
from .sampling import derive_seed, rank_range
from .shards_index import ShardSet
from .reading import find_undecodable

T = TypeVar("T")


def build_pipeline(shards: ShardSet, cfg: DataConfig, *, batch_size: int, train: bool, rank: int,
                   world_size: int, device_id: int | None, seed: int,
                   with_keys: bool = False) -> Pipeline:
    """The DALI pipeline for one rank. Outputs `rgb` (uint8 B,3,S,S) and, with `with_keys`,
    `keys`: each sample's source as zero-padded bytes `<tar path>:<offset>:<member name>`."""
    start, stop = rank_range(shards.total, world_size, rank)
    gpu = device_id is not None
    size = cfg.crop_size
    pipe = Pipeline(batch_size=batch_size, num_threads=cfg.num_threads, device_id=device_id,
                    seed=seed, prefetch_queue_depth=cfg.prefetch)
    with pipe:
        jpegs = fn.readers.webdataset(
            paths=[str(s.tar) for s in shards.shards],
            index_paths=[str(s.index) for s in shards.shards] if all(s.index for s in shards.shards) else None,
            ext=["jpg"], missing_component_behavior="skip", shard_id=rank, num_shards=world_size,
            # Each rank keeps its own part: disjoint ranks in every epoch, and each node's
            # page cache only ever holds its part of the data.
            stick_to_shard=True, random_shuffle=train,
            # A buffer larger than the rank's part would only hold repeats.
            initial_fill=max(1, min(cfg.shuffle_buffer, stop - start)), name="reader")
        decoder = dict(device="mixed", hw_decoder_load=cfg.hw_decoder_load) if gpu else dict(device="cpu")
        mirror = fn.random.coin_flip(probability=0.5) if train and cfg.flip else 0
        if train and cfg.random_resized_crop:
            # Decodes only the crop window (ImageNet-style RRC), then scales it to S x S.
            images = fn.decoders.image_random_crop(
                jpegs, output_type=types.RGB, random_area=[cfg.rrc_min_scale, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **decoder)
            images = fn.resize(images, size=[size, size], antialias=True)
            crop = dict()
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
            # Bicubic, as pix2pix's and the tutorial's PIL resizes; square: their squash.
            # Validation resizes the same way and takes the centre crop (geometry.Augment).
            side = cfg.load_size
            shape = dict(size=[side, side]) if cfg.resize == "square" else dict(resize_shorter=side)
            images = fn.resize(images, interp_type=types.INTERP_CUBIC, antialias=True, **shape)
            crop = dict(crop=(size, size))
            if train:
                crop.update(crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                            crop_pos_y=fn.random.uniform(range=(0.0, 1.0)))
        # One fused kernel: crop, flip, HWC->CHW, stay uint8. "pad" guards against a resize
        # that rounds a side to S-1 (it would otherwise abort the pipeline).
        rgb = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW",
                                       mirror=mirror, out_of_bounds_policy="pad", **crop)
        outputs = [rgb]
        if with_keys:
            outputs.append(fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0))
        pipe.set_outputs(*outputs)
    return pipe


def _key_from_source(raw: torch.Tensor) -> str:
    """`/x/train-000001.tar:2048:k.jpg` -> `train-000001.tar/k`, the torch backend's key format."""
    text = bytes(raw.tolist()).rstrip(b"\0").decode()
    path, _, member = text.rsplit(":", 2)
    return f"{Path(path).name}/{split_name(member)[0]}"


class DaliBatches:
    """Endless per-rank stream of uint8 batches; see the module docstring for epochs."""

    skipped = 0  # DALI cannot skip a bad sample: it raises (turned into DataError)

    def __init__(self, shards: ShardSet, cfg: DataConfig, *, batch_size: int, train: bool,
                 rank: int, world_size: int, device: torch.device, seed: int,
                 exact_epochs: bool = False) -> None:
        self.shards, self.cfg, self.train, self.exact_epochs = shards, cfg, train, exact_epochs
        self.batch_size = batch_size
        self.rank, self.world_size, self.device, self.seed = rank, world_size, device, seed
        self.device_id: int | None = None  # DALI's CPU-only mode
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        self._iter: DALIGenericIterator | None = None
        self._next_epoch: int | None = None
        self._with_keys = False

    def batches(self, epoch: int, count: int, with_keys: bool = False
                ) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        """`count` batches of epoch `epoch`: (uint8 (B,3,S,S) on the device, keys or None)."""
        if (self._iter is None or not self.train or self.exact_epochs
                or epoch != self._next_epoch or with_keys != self._with_keys):
            self._guard(lambda: self._start(epoch, with_keys))  # the iterator prefetches: it can fail
        self._next_epoch = epoch + 1
        for _ in range(count):
            out = self._guard(lambda: next(self._iter))[0]
            rgb = out["rgb"] if self.device_id is not None else out["rgb"].to(self.device)
            keys = [_key_from_source(k) for k in out["keys"]] if with_keys else None
            yield rgb, keys

    def _start(self, epoch: int, with_keys: bool) -> None:
        self._iter = None  # release the previous pipeline before building another
        decoder_log_filter.install()  # before DALI decodes anything
        pipe = build_pipeline(self.shards, self.cfg, batch_size=self.batch_size, train=self.train,
                              rank=self.rank,
                              world_size=self.world_size, device_id=self.device_id,
                              seed=derive_seed(self.seed, epoch, self.rank), with_keys=with_keys)
        pipe.build()
        # No reader_name and size=-1: the iterator never ends an epoch itself; we count batches.
        # dynamic_shape: the padded key bytes change length from batch to batch.
        self._iter = DALIGenericIterator([pipe], ["rgb", "keys"] if with_keys else ["rgb"],
                                         dynamic_shape=with_keys)
        self._with_keys = with_keys

    def _guard(self, step: Callable[[], T]) -> T:
        """step(); DALI's RuntimeError becomes a one-line DataError, raised once the failed
        pipeline is gone. It sits in reference cycles, so its threads would live on until some
        later garbage collection, and a fork meanwhile (DataLoader workers) can copy a lock
        one of them holds: the child then hangs."""
        try:
            return step()
        except RuntimeError as exc:
            self._iter = None
            error = self._decode_error(exc)
        gc.collect()
        raise error  # outside `except`: no exception context keeps the pipeline alive

    def _decode_error(self, exc: RuntimeError) -> DataError:
        # DALI's message is a multi-line traceback; keep its one informative line.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "failure" in line or "failed: " in line
                       or line.startswith("Failed to decode")), lines[0] if lines else "error")
        reason = reason.split("failed: ", 1)[-1]  # DALI's assertion text before it is C++ source
        start, stop = rank_range(self.shards.total, self.world_size, self.rank)
        where = find_undecodable(self.shards, start, stop) or "no undecodable JPEG found by a CPU scan"
        fallback = "" if "is damaged" in where else ", or use data.backend=torch, which skips corrupt samples"
        return DataError(f"DALI failed on rank {self.rank}'s part of {self.shards.root} "
                         f"({self.shards.split}): {reason}; {where}. Rewrite the shards with "
                         f"`make shards`{fallback}")
