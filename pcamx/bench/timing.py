"""Timing and memory helpers shared by every section.

A figure is the median over `repeats` of images/s, each repeat a back-to-back run of steps after a
warm-up. Without `iters`, each repeat runs for `duration / repeats` seconds, so slow devices
automatically get fewer iterations and fast ones more, and the whole benchmark keeps to its time budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pcamx.hardware import sync


@dataclass(frozen=True)
class Timing:
    repeats: int = 3
    duration: float = 4.0  # seconds of timed work per figure, all repeats together
    iters: int | None = None  # fixed steps per repeat; overrides `duration`
    warmup: int = 2  # untimed steps before the first repeat

    def describe(self) -> dict[str, Any]:
        return {"repeats": self.repeats, "duration_s": self.duration, "iters": self.iters, "warmup": self.warmup}


def measure(
    step: Callable[[], int], device: torch.device, timing: Timing, warmup: int | None = None
) -> dict[str, Any]:
    """Images/s of `step` (one iteration; returns how many images it handled): median over repeats.

    The clock is read after a device sync at both ends of a repeat, not per step, so queued kernels
    may overlap as they would in a real loop.
    """
    warmup = max(1, timing.warmup if warmup is None else warmup)
    sync(device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start

    rates, iters = [], []
    slice_s = timing.duration / timing.repeats
    for _ in range(timing.repeats):
        sync(device)
        start = time.perf_counter()
        images = steps = 0
        # A time slice instead of a step count estimated from warm-up: a data loader's prefetch buffer
        # makes warm-up steps look free and would turn an estimate into a huge count.
        while True:
            images += step()
            steps += 1
            if timing.iters is not None:
                if steps >= timing.iters:
                    break
            elif time.perf_counter() - start >= slice_s:
                break
        sync(device)
        rates.append(images / (time.perf_counter() - start))
        iters.append(steps)
    return {
        "images_per_s": statistics.median(rates),
        "repeat_images_per_s": rates,
        "timed_iters": iters,
        "repeats": timing.repeats,
        "warmup_iters": warmup,
        "warmup_s": warmup_s,
    }


def median_of(fn: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    values = [fn() for _ in range(repeats)]
    return statistics.median(values), values


def rss_bytes() -> int | None:
    """Resident set size of this process, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so that an RSS rise measures new allocations instead
    of hiding in memory that earlier figures freed but the allocator kept."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the code inside the block.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only, model and optimizer state included).
    CPU: the rise of this process's RSS over its value at entry (after trimming the heap), sampled every
    few ms; approximate, and data-loader workers are other processes, so their memory is not in it.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.result: dict[str, Any] = {"peak_bytes": None, "kind": None}
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, rss_bytes() or 0)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            trim_heap()
            self._base = rss_bytes()
            if self._base is not None:
                self._peak = self._base
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result = {"peak_bytes": torch.cuda.max_memory_allocated(self.device), "kind": "cuda_max_allocated"}
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes() or 0)
            self.result = {"peak_bytes": self._peak - self._base, "kind": "cpu_rss_delta"}
