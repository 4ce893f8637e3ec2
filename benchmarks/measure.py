"""The one timing helper of the benchmark.

A figure is the median over `repeats` of images/s, each repeat a back-to-back run of steps after a
warm-up, with a device sync at both ends (not per step, so queued kernels overlap as in a real loop).
Without `iters`, each repeat runs for `duration / repeats` seconds: slow devices get fewer iterations and
fast ones more, and the whole benchmark keeps to its time budget.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pcamx.runtime.timing import sync


@dataclass(frozen=True)
class Timing:
    repeats: int
    duration: float  # seconds of timed work per figure, all repeats together
    iters: int | None  # fixed steps per repeat; overrides `duration`
    warmup: int  # untimed steps before the first repeat

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def measure(step: Callable[[], int], device: torch.device, timing: Timing, warmup: int | None = None
            ) -> dict[str, Any]:
    """Images/s of `step` (one iteration; returns how many images it handled): the median over repeats."""
    warmup = max(1, timing.warmup if warmup is None else warmup)
    for _ in range(warmup):
        step()
    rates, iters = [], []
    for _ in range(timing.repeats):
        sync(device)
        start, images, steps = time.perf_counter(), 0, 0
        # A time slice, not a step count estimated from warm-up: a loader's prefetch buffer makes warm-up
        # steps look free and would turn an estimate into a huge count.
        while (steps < timing.iters) if timing.iters is not None else \
                (steps == 0 or time.perf_counter() - start < timing.duration / timing.repeats):
            images += step()
            steps += 1
        sync(device)
        rates.append(images / (time.perf_counter() - start))
        iters.append(steps)
    return {"images_per_s": statistics.median(rates), "repeat_images_per_s": rates, "timed_iters": iters,
            "repeats": timing.repeats, "warmup_iters": warmup}


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """images/s of figure `a` ÷ that of `b` (None when either is missing)."""
    try:
        return a["images_per_s"] / b["images_per_s"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None
