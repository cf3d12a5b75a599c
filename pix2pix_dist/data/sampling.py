"""Who reads what, how many batches an epoch has, and which seed each random stream uses.

Both backends follow DALI's sharding rule so that they see the same samples on each rank:
the split is the concatenation of its shards in order, and rank r of w reads positions
[total*r//w, total*(r+1)//w). Ranks' parts differ by at most one sample, so every rank yields
exactly floor(total / (world * batch)) batches per epoch: never more than the smallest part
can give, hence equal counts everywhere (unequal counts hang DDP's collectives).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError


def rank_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Positions [start, stop) of the split that `rank` reads (DALI's num_shards split)."""
    return total * rank // world_size, total * (rank + 1) // world_size


def batches_per_epoch(total: int, world_size: int, batch_size: int, where: str) -> int:
    """Batches every rank yields per epoch; DataError when not even one fits."""
    n = total // (world_size * batch_size)
    if n < 1:
        raise DataError(f"{where} has {total} samples, fewer than processes x batch_size = "
                        f"{world_size} x {batch_size} = {world_size * batch_size}; "
                        f"lower data.batch_size, use fewer processes or write more data")
    return n


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers (seed, epoch, rank, ...): nearby inputs give
    unrelated streams, and it fits DALI's and Python's seed arguments."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0]) >> 1
