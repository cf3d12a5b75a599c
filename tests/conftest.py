"""Shared fixtures: real shards built from the photos that ship with scikit-image."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """scikit-image's colour photos as shards (resized small so CPU tests stay fast)."""
    from pix2pix_dist.shards import ShardOptions, build_shards

    out = tmp_path_factory.mktemp("sample_shards")
    build_shards(ShardOptions(source="sample", output=out, val_fraction=0.2, shard_size="4",
                              seed=0, workers=2, progress=False, resize=96))
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without wandb/accelerate settings: runs behave as on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


def run_python(args: list[str], *, cwd: Path = REPO, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python <args>` like a user would, without credentials or a terminal."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=clean_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def free_port() -> int:
    """A TCP port free on this machine now, for a test's own rendezvous (gloo on localhost)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_unlistable_folder(parent: Path) -> None:
    """Nested folders below `parent` whose path exceeds PATH_MAX: listing the deepest fails
    (ENAMETOOLONG) even for root, where permission bits would not stop a read."""
    fd = os.open(parent, os.O_RDONLY)
    for _ in range(17):
        os.mkdir("d" * 250, dir_fd=fd)
        fd, above = os.open("d" * 250, os.O_RDONLY, dir_fd=fd), fd
        os.close(above)
    os.close(fd)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly (with a reason) on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
