"""The COCO colorization tutorial's loader, reproduced faithfully (its per-sample CPU work is the
point)."""

from __future__ import annotations

import io
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BenchError
from ..shard_format import group_samples, split_name

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def index_tar_images(tars: list[Path]) -> list[tuple[str, int, int]]:
    """(tar path, data offset, size) of every image member: random access like the tutorial's
    list of file paths, read straight out of the shards so all loaders see the same bytes."""
    items = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            for _, members in group_samples(tf):
                items += [(str(tar), m.offset_data, m.size) for m in members
                          if split_name(m.name)[1].lower() in IMAGE_EXTENSIONS]
    return items


class TutorialColorizationDataset(torch.utils.data.Dataset):
    """The tutorial's `ColorizationDataset` (train split) over tar members.

    Its length is the samples repeated `repeat` times: the benchmark must not measure epoch
    boundaries (a small set would leave most workers idle at each one), only per-sample work."""

    def __init__(self, items: list[tuple[str, int, int]], size: int, repeat: int = 1) -> None:
        from PIL import Image
        from torchvision import transforms

        self.items, self.repeat = items, repeat
        self.transforms = transforms.Compose([
            transforms.Resize((size, size), Image.BICUBIC),
            transforms.RandomHorizontalFlip(),
        ])
        self._files: dict[str, Any] = {}  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.items) * self.repeat

    def _read(self, idx: int) -> bytes:
        path, offset, size = self.items[idx % len(self.items)]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        f.seek(offset)
        return f.read(size)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        from PIL import Image
        from skimage.color import rgb2lab
        from torchvision import transforms

        img = Image.open(io.BytesIO(self._read(idx))).convert("RGB")
        img = self.transforms(img)
        img = np.array(img)
        img_lab = rgb2lab(img).astype("float32")
        img_lab = transforms.ToTensor()(img_lab)
        L = img_lab[[0], ...] / 50. - 1.
        ab = img_lab[[1, 2], ...] / 110.
        return {"L": L, "ab": ab}


def tutorial_batches(tars: list[Path], *, batch_size: int, size: int, workers: int,
                     device: torch.device, min_samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (L, ab) batches on `device` from the tutorial's DataLoader setup."""
    items = index_tar_images(tars)
    if not items:
        raise BenchError(f"no images inside {tars[0].parent}/train-*.tar")
    dataset = TutorialColorizationDataset(items, size, repeat=max(1, math.ceil(min_samples / len(items))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    while True:
        for batch in loader:
            yield (batch["L"].to(device, non_blocking=True),
                   batch["ab"].to(device, non_blocking=True))
