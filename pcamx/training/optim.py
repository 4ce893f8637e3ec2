"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(param_groups: list[dict], device: torch.device, lr: float) -> torch.optim.AdamW:
    """AdamW; the fused kernel on CUDA (one launch for all parameters instead of one per tensor)."""
    return torch.optim.AdamW(param_groups, lr=lr, fused=device.type == "cuda")


def warmup_cosine(step: int, warmup: int, total: int, zero_start: bool = False) -> float:
    """LR multiplier: linear 0→1 over `warmup` steps, then cosine 1→0 at `total`.

    The warmup is (step + 1) / warmup, so no step is spent at lr 0; `zero_start` makes it step / warmup
    (step 0 at lr 0), as the reference protocol does."""
    if step < warmup:
        return (step if zero_start else step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
