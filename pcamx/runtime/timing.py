"""The one way pcamx times work: metrics.json's latency and throughput, the export's latencies, `make bench`.

A measurement is `warmup` untimed calls, then `samples` timed samples. A sample is `calls` back-to-back calls
(or as many as fit in its share of `seconds`) with the device synchronised at its two ends only, so queued
kernels overlap inside it as in a real loop. Latency is one call per sample and the median sample; throughput
is the median over samples of the work done per second.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def sync(device: torch.device | None) -> None:
    """Wait for the device's queued work, so a wall-clock timer measures it (a no-op off CUDA)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Measured:
    seconds: tuple[float, ...]  # wall-clock seconds of each sample
    calls: tuple[int, ...]  # calls in each sample
    units: tuple[float, ...]  # work done in each sample (what `step` returned, summed; 1 per call otherwise)
    warmup: int

    @property
    def median_ms(self) -> float:
        """Median milliseconds per call."""
        return statistics.median(s / c for s, c in zip(self.seconds, self.calls, strict=True)) * 1e3

    @property
    def rate(self) -> float:
        """Median over samples of units per second."""
        return statistics.median(u / s for u, s in zip(self.units, self.seconds, strict=True))

    def describe(self) -> dict[str, Any]:
        return {"images_per_s": self.rate, "repeat_images_per_s": [u / s for u, s in zip(self.units, self.seconds,
                                                                                         strict=True)],
                "timed_iters": list(self.calls), "repeats": len(self.seconds), "warmup_iters": self.warmup}


def measure(step: Callable[[], Any], *, device: torch.device | None = None, warmup: int = 1, samples: int = 1,
            calls: int | None = None, seconds: float | None = None) -> Measured:
    """Time `step()` (see the module docstring). Each sample runs `calls` calls, or, without `calls`, keeps
    calling until it has run for `seconds / samples` (at least one call). A `step` that returns a number
    reports the work it did (images); otherwise each call counts as one unit."""
    if samples < 1 or (calls is not None and calls < 1):
        raise ValueError(f"samples and calls must be >= 1, got {samples} and {calls}")
    if calls is None and seconds is None:
        raise ValueError("give the calls per sample or the seconds to measure for")
    for _ in range(warmup):
        step()
    times, counts, work = [], [], []
    for _ in range(samples):
        sync(device)
        start, n, units = time.perf_counter(), 0, 0.0
        # A time slice, not a count estimated from the warm-up: a loader's prefetch buffer makes warm-up calls
        # look free and would turn an estimate into a huge count.
        while n < calls if calls is not None else (n == 0 or time.perf_counter() - start < seconds / samples):
            done = step()
            units += done if isinstance(done, int | float) and not isinstance(done, bool) else 1
            n += 1
        sync(device)
        times.append(time.perf_counter() - start)
        counts.append(n)
        work.append(units)
    return Measured(tuple(times), tuple(counts), tuple(work), warmup)
