"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda > mps > cpu; an explicit device that is not there is an error, not a fallback."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {DEVICES}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "hardware=cuda but no CUDA device is available "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
            "Use hardware=auto to fall back to mps/cpu, or hardware=cpu."
        )
    if name == "mps" and not _mps_available():
        raise RuntimeError("hardware=mps but the MPS backend is not available. Use hardware=auto or hardware=cpu.")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked for and supported; a no-op context otherwise."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"hardware.precision must be 'fp32' or 'bf16', got {precision!r}")
    return contextlib.nullcontext()


def setup_threads(hw_cfg: Mapping[str, Any]) -> None:
    threads = hw_cfg.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock timer measures it (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
