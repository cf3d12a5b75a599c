"""Timing a repeated step: warm-up apart, the device synchronized only around the clock reads."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    iterations: int
    items: int
    seconds: float
    first_s: float
    """Duration of the very first call (start-up, cuDNN autotuning, torch.compile...)."""

    @property
    def per_second(self) -> float:
        return self.items / self.seconds


def time_iterations(step: Callable[[], int], *, device: torch.device, seconds: float, warmup: int,
                    max_iters: int | None = None, quantum: int = 1) -> Timing:
    """Call `step` (which returns the items it handled) until `seconds` have passed.

    Warm-up calls (at least one: the first call is timed apart as start-up) are excluded. The
    device is synchronized only before reading the clock, so queued GPU work is counted without
    stalling the pipeline every step. `quantum` rounds the warm-up and timed counts to whole
    rounds of a round-robin DataLoader (one batch per worker): its workers finish their batches
    in bursts, and a window that cut a burst in half would be off by up to one burst."""
    quantum = max(1, quantum)
    start = time.perf_counter()
    step()
    synchronize(device)
    first_s = time.perf_counter() - start
    for _ in range(math.ceil(max(1, warmup) / quantum) * quantum - 1):
        step()
    synchronize(device)
    items = iters = 0
    start = time.perf_counter()
    while True:
        items += step()
        iters += 1
        if iters % quantum:
            continue
        if max_iters is not None and iters >= max_iters:
            break
        if time.perf_counter() - start >= seconds:
            break
    synchronize(device)
    return Timing(iters, items, time.perf_counter() - start, first_s)
