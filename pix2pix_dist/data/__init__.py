"""Input pipeline: WebDataset shards -> (L, ab) batches on the training device.

    loader = build_loader(find_shards(root, "train"), cfg.data, batch_size=b, rank=r,
                          world_size=w, device=dev, seed=s)
    for L, ab in loader: ...

DALI (GPU decode) where installed, else the torch fallback; Lab via Kornia on the device.
"""

from ..errors import DataError
from .lab import lab_to_rgb, rgb_to_lab
from .loader import build_loader

__all__ = ["DataError", "build_loader", "lab_to_rgb", "rgb_to_lab"]
