"""Post-training quantization of a (possibly compressed) classifier for inference.

Modes:
  none  the model as it is, moved to `device`.
  bf16  every parameter and buffer stored and computed in bfloat16. The backbone casts pixel_values to the
        patch-embedding dtype itself, so callers pass float32 images as usual, but the logits come back in
        bfloat16: callers should `.float()` them before softmax, losses or metrics.
  int8  torchao: weight-only int8 on CUDA (the activations keep the model's float dtype), dynamic int8
        activations + int8 weights on CPU. Logits stay in the model's float dtype. Every nn.Linear is
        quantized, including the factorized halves of LowRankLinear and the classifier head.
Quantization is in place and meant for inference only (torchao's int8 tensors have no backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

QUANT_MODES = ("none", "bf16", "int8")
INT8_DEVICES = ("cpu", "cuda")


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` can run a bfloat16 matmul (probed, except on CUDA where torch can say)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        (probe @ probe).sum().item()
    except (RuntimeError, TypeError):
        return False
    return True


def _int8_quantizer(device: torch.device) -> Callable[[nn.Module], None]:
    """The torchao quantization that fits `device`, as a function that rewrites a model in place."""
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as err:
        raise RuntimeError("quantization mode 'int8' needs torchao: pip install torchao") from err
    # CUDA has fast int8-weight kernels for float activations; on CPU the win comes from int8 GEMMs,
    # which need the activations quantized too (per token, at run time).
    config = Int8WeightOnlyConfig() if device.type == "cuda" else Int8DynamicActivationInt8WeightConfig()
    return lambda model: quantize_(model, config)


def eval_precision_label(mode: str, device: torch.device | str, precision: str = "fp32") -> str:
    """How a model quantized with `mode` is evaluated on `device`: "fp32" / "bf16-autocast" for an
    unquantized model (at `precision`), else its own dtype ("bf16", "int8-weight-only", "int8-dynamic")."""
    if mode == "none":
        return "fp32" if precision == "fp32" else f"{precision}-autocast"
    if mode == "int8":
        return "int8-weight-only" if torch.device(device).type == "cuda" else "int8-dynamic"
    return mode


def check_quantization(mode: str, device: torch.device | str) -> None:
    """Raise a clear error when `mode` cannot run on `device` (called before training starts)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; allowed: {', '.join(QUANT_MODES)}")
    device = torch.device(device)
    # Check the combination before moving anything, so an unsupported request fails with a clear message
    # instead of a kernel error in the middle of evaluation.
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"quantization mode {mode!r} was asked for on {device}, but CUDA is not available")
    if mode == "bf16" and not bf16_supported(device):
        raise RuntimeError(f"quantization mode 'bf16' is not supported on {device}; use 'none' there")
    if mode == "int8" and device.type not in INT8_DEVICES:
        raise ValueError(
            f"quantization mode 'int8' runs on {' or '.join(INT8_DEVICES)}, not {device.type}; "
            "use 'none' or 'bf16' there"
        )
    if mode == "int8":
        _int8_quantizer(device)


def quantize(model: nn.Module, mode: str, device: torch.device | str) -> nn.Module:
    """Move `model` to `device` and quantize it in place with `mode` (none|bf16|int8); returns it."""
    check_quantization(mode, device)
    device = torch.device(device)
    int8 = _int8_quantizer(device) if mode == "int8" else None

    model.to(device)
    if mode == "bf16":
        model.to(torch.bfloat16)
    elif int8 is not None:
        int8(model)
    return model
