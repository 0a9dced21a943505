"""Honest wall-clock timing: warm-up discarded, device synchronised before reading the clock, median + spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call over ``repeats`` measured calls."""

    median: float
    low: float  # min
    high: float  # max
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the measurement was."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def __str__(self) -> str:
        return f"{self.median * 1e3:.1f} ms (min {self.low * 1e3:.1f}, max {self.high * 1e3:.1f}, n={self.repeats})"


def measure(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5, device=None) -> Timing:
    """Time ``fn()``: ``warmup`` calls discarded, then ``repeats`` calls each bracketed by device syncs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), min(samples), max(samples), repeats)
