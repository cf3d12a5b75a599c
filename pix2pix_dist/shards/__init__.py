"""Shard writer: images -> shuffled WebDataset tars + DALI indexes + manifest.json (`make shards`).

    from pix2pix_dist.shards import ShardOptions, build_shards, verify_shards, ShardError
    manifest = build_shards(ShardOptions(source="sample", output=Path("shards/sample")))
    assert verify_shards(Path("shards/sample")) == []
"""

from ..errors import ShardError
from .build import build_shards
from .options import ShardOptions
from .verify import verify_shards

__all__ = ["ShardError", "ShardOptions", "build_shards", "verify_shards"]
