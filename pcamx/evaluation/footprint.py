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

import torch
from omegaconf import DictConfig
from ptflops import get_model_complexity_info
from torch import nn

from pcamx.runtime.hardware import autocast
from pcamx.runtime.timing import measure


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


def latency_ms(model: nn.Module, example_batch: torch.Tensor, warmup: int = 10, iters: int = 50) -> float:
    """Median wall-clock milliseconds of one eval-mode forward on `example_batch`."""
    x = _prepare(model, example_batch)
    with _eval_mode(model), torch.inference_mode():
        return measure(lambda: model(x), device=x.device, warmup=warmup, samples=iters, calls=1).median_ms


def throughput_ips(model: nn.Module, batch: torch.Tensor, warmup: int = 10, iters: int = 50) -> float:
    """Images per second over `iters` back-to-back eval-mode forwards of `batch` (no sync between them, so
    queued kernels overlap as in evaluation)."""
    x = _prepare(model, batch)
    with _eval_mode(model), torch.inference_mode():
        timed = measure(lambda: model(x), device=x.device, warmup=warmup, calls=iters)
    return x.shape[0] * iters / timed.seconds[0]


def cost(model: torch.nn.Module, resolution: int) -> dict[str, float]:
    """What a budget limits: parameters and forward GFLOPs at the run's resolution."""
    return {"params": count_params(model), "gflops": gflops(model, resolution, device=next(model.parameters()).device)}


def footprint(model: torch.nn.Module, resolution: int) -> dict[str, float]:
    figures = cost(model, resolution)
    return {"params": figures["params"], "gflops": round(figures["gflops"], 4), "memory_mb": round(memory_mb(model), 4)}


def speed(model: torch.nn.Module, cfg: DictConfig, device: torch.device, precision: str) -> dict[str, float]:
    """Latency at batch 1 and throughput at the eval batch size, model forward only, after warm-up."""
    if not cfg.eval.measure_speed:
        return {}
    res, warmup, iters = cfg.data.resolution, cfg.eval.speed_warmup, cfg.eval.speed_iters
    with autocast(device, precision):
        return {
            "latency_ms_b1": round(latency_ms(model, torch.randn(1, 3, res, res, device=device), warmup, iters), 4),
            "throughput_ips": round(throughput_ips(
                model, torch.randn(cfg.data.eval_batch_size, 3, res, res, device=device), warmup, iters), 2),
        }
