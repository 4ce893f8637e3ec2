"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

log = logging.getLogger("pcamx")

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16")
AUTOCAST_DEVICES = ("cuda", "cpu")  # where bf16 autocast runs


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


def check_precision(precision: str, key: str, device: torch.device | None = None) -> str:
    """`precision` if it is one of PRECISIONS (and bf16 autocast runs on `device`); a clear error otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"{key} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device is not None and precision == "bf16" and device.type not in AUTOCAST_DEVICES:
        raise ValueError(
            f"{key}=bf16: bf16 autocast runs on {' or '.join(AUTOCAST_DEVICES)}, not {device.type}; "
            f"set {key}=fp32 there"
        )
    return precision


def resolve_precision(precision: str, key: str, device: torch.device, hardware_device: str) -> str:
    """The precision a run actually uses for `key` (train.precision / eval.precision).

    `hardware=auto` means "bf16 where it pays": its bf16 becomes fp32 when no CUDA device was found
    (bf16 autocast on a CPU is slower than fp32 there). Any other hardware gets exactly what it asks for,
    or an error before anything runs."""
    check_precision(precision, key)
    if precision == "bf16" and hardware_device == "auto" and device.type != "cuda":
        return "fp32"
    return check_precision(precision, key, device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (CUDA or CPU) for "bf16"; a no-op context for "fp32"."""
    if check_precision(precision, "precision", device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup_threads(hw_cfg: Mapping[str, Any]) -> None:
    threads = hw_cfg.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))


def effective_precisions(cfg: DictConfig, device: torch.device) -> DictConfig:
    """A copy of `cfg` whose train.precision / eval.precision say what will actually run on `device`
    (hardware=auto turns bf16 into fp32 off CUDA); a precision the device cannot run is an error."""
    cfg = copy.deepcopy(cfg)
    for key in ("train", "eval"):
        asked = cfg[key].precision
        cfg[key].precision = resolve_precision(asked, f"{key}.precision", device, cfg.hardware.device)
        if cfg[key].precision != asked:
            log.info("%s.precision: %s asked, %s on %s (hardware=auto uses bf16 on CUDA only)",
                     key, asked, cfg[key].precision, device)
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
