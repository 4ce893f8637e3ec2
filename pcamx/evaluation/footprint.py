"""Model size and cost figures for metrics.json and the comparison tables.

GFLOPs convention (see `gflops`): ptflops' "pytorch" backend with module hooks only
(`count_functional=False`), reported as 2 × MACs. It counts every nn.Linear and nn.Conv2d
(bias adds included) and nn.LayerNorm (one op per element); it does not count the attention
core (QKᵀ, softmax, AV), RoPE, GELU or residual adds. For DINOv3 ViT-S/16 at 224 px
(196 patches + CLS + 4 registers = 201 tokens) this is 4,335,184,514 MACs = 8.67 GFLOPs, the
reference figure. Module-only counting is used because it does not depend on the attention
kernel: with functional counting on, eager attention adds the QKᵀ/AV matmuls and softmax
(+0.75 GFLOPs, 9.42) while SDPA, which ptflops cannot see, adds nothing.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from ptflops import get_model_complexity_info
from torch import nn

from pcamx.runtime.hardware import sync


def count_params(model: nn.Module) -> int:
    """All parameters, trainable or frozen (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def memory_mb(model: nn.Module) -> float:
    """Size of the serialized `state_dict` (what a checkpoint costs on disk), in MB (1e6 bytes)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 1e6


def _first_param(model: nn.Module) -> torch.Tensor | None:
    return next(model.parameters(), None)


class _Probe(nn.Module):
    """Throwaway wrapper: ptflops attaches its helper methods and counters to the module it is
    given and never removes them, so they land here instead of on the caller's model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def gflops(model: nn.Module, resolution: int, device: str | torch.device = "cpu") -> float:
    """Forward GFLOPs (2 × ptflops MACs) for one (1, 3, resolution, resolution) image.

    Counting convention in the module docstring. The model is run in eval mode on `device`;
    its device and every submodule's train/eval flag are restored afterwards.
    """
    first = _first_param(model)
    home = first.device if first is not None else None
    dtype = first.dtype if first is not None else torch.float32
    modes = {m: m.training for m in model.modules()}
    target = torch.device(device)

    def make_input(res: tuple[int, ...]) -> torch.Tensor:
        # Zeros rather than ptflops' uninitialised tensor: same count, no NaN/inf surprises.
        return torch.zeros((1, *res), dtype=dtype, device=target)

    out = io.StringIO()
    try:
        if home is not None and home != target:
            model.to(target)
        with torch.no_grad(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            macs, _ = get_model_complexity_info(
                _Probe(model),
                (3, resolution, resolution),
                as_strings=False,
                print_per_layer_stat=False,
                verbose=False,
                input_constructor=make_input,
                ost=out,
                backend="pytorch",
                backend_specific_config={"count_functional": False},
            )
    finally:
        if home is not None and home != target:
            model.to(home)
        for m, training in modes.items():
            m.training = training
    if macs is None:
        # ptflops swallows the exception and prints it; hand its output back instead.
        raise RuntimeError(f"ptflops failed to count {type(model).__name__}:\n{out.getvalue()}")
    return 2 * macs / 1e9


def _prepare(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    first = _first_param(model)
    if first is None:
        return batch
    # A bf16 model needs a bf16 input; integer inputs (e.g. uint8 images) are left alone.
    dtype = first.dtype if batch.is_floating_point() else batch.dtype
    return batch.to(device=first.device, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def median_ms(step: Callable[[], Any], iters: int = 50, warmup: int = 10,
              device: torch.device | None = None) -> float:
    """Median wall-clock milliseconds of `step()` over `iters` calls after `warmup` untimed ones. With a
    `device`, both ends of each call are synchronised so a sample covers exactly that call's kernels."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device is not None:
            sync(device)
        start = time.perf_counter()
        step()
        if device is not None:
            sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def latency_ms(model: nn.Module, example_batch: torch.Tensor, warmup: int = 10, iters: int = 50) -> float:
    """Median wall-clock milliseconds of one eval-mode forward on `example_batch`."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    x = _prepare(model, example_batch)
    with _eval_mode(model), torch.inference_mode():
        return median_ms(lambda: model(x), iters, warmup, x.device)


def throughput_ips(model: nn.Module, batch: torch.Tensor, warmup: int = 10, iters: int = 50) -> float:
    """Images per second over `iters` back-to-back eval-mode forwards of `batch`."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    x = _prepare(model, batch)
    with _eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync(x.device)
        start = time.perf_counter()
        # No per-iteration sync: throughput should include the overlap of queued kernels.
        for _ in range(iters):
            model(x)
        sync(x.device)
        elapsed = time.perf_counter() - start
    return x.shape[0] * iters / elapsed
