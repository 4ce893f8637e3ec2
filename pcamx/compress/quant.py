"""Post-training quantization of a (possibly compressed) classifier, for inference only, in place (`QUANT_MODES`):
none (the model as it is), bf16 (every parameter and buffer in bfloat16; images go in as float32, logits come out
in bfloat16: `.float()` them), int8 (torchao: weight-only on CUDA, dynamic activations + weights on CPU; every
nn.Linear, LowRankLinear halves and the head included; no backward).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import torch
from torch import nn

INT8_DEVICES = ("cpu", "cuda")


class EvalPrecision(StrEnum):
    """How a model's test numbers are computed (metrics.json's `eval_precision`), in table order."""

    FP32 = "fp32"  # unquantized, fp32
    BF16_AUTOCAST = "bf16-autocast"  # unquantized, under bf16 autocast
    BF16 = "bf16"  # quant=bf16: weights and compute in bf16
    INT8_WEIGHT_ONLY = "int8-weight-only"  # quant=int8 on CUDA
    INT8_DYNAMIC = "int8-dynamic"  # quant=int8 on the CPU

    @classmethod
    def of(cls, quant: str, device: torch.device | str, precision: str = "fp32") -> EvalPrecision:
        """An unquantized model runs at `precision`; a quantized one in its own dtype on `device`."""
        if quant == "none":
            return cls.FP32 if precision == "fp32" else cls.BF16_AUTOCAST
        if quant == "int8":
            return cls.INT8_WEIGHT_ONLY if torch.device(device).type == "cuda" else cls.INT8_DYNAMIC
        return cls(quant)

    @property
    def quant(self) -> str:
        return "none" if self in (EvalPrecision.FP32, EvalPrecision.BF16_AUTOCAST) else self.value.split("-")[0]

    @property
    def label(self) -> str:
        """The tables' Quantization column, as the reference table writes it: `none (f32)`, `int8 (dynamic)`."""
        return {"fp32": "none (f32)", "bf16-autocast": "none (bf16 autocast)", "bf16": "bf16",
                "int8-weight-only": "int8 (weight-only)", "int8-dynamic": "int8 (dynamic)"}[self.value]


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
        raise RuntimeError("quant=int8 needs torchao: pip install torchao") from err
    # CUDA has fast int8-weight kernels for float activations; on CPU the win comes from int8 GEMMs,
    # which need the activations quantized too (per token, at run time).
    config = Int8WeightOnlyConfig() if device.type == "cuda" else Int8DynamicActivationInt8WeightConfig()
    return lambda model: quantize_(model, config)


# Mode → what it does to a model already on its device.
QUANT_MODES: dict[str, Callable[[nn.Module, torch.device], object] | None] = {
    "none": None,
    "bf16": lambda model, device: model.to(torch.bfloat16),
    "int8": lambda model, device: _int8_quantizer(device)(model),
}


def check_quantization(mode: str, device: torch.device | str) -> None:
    """Raise a clear error when `mode` cannot run on `device` (called before training starts)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; allowed: {', '.join(QUANT_MODES)}")
    device = torch.device(device)
    # Check the combination before moving anything, so an unsupported request fails with a clear message
    # instead of a kernel error in the middle of evaluation.
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"quant={mode} was asked for on {device}, but CUDA is not available")
    if mode == "bf16" and not bf16_supported(device):
        raise RuntimeError(f"quant=bf16 is not supported on {device}; use quant=none there")
    if mode == "int8" and device.type not in INT8_DEVICES:
        raise ValueError(f"quant=int8 runs on {' or '.join(INT8_DEVICES)}, not {device.type}; use quant=none or "
                         "quant=bf16 there")
    if mode == "int8":
        _int8_quantizer(device)


def quantize(model: nn.Module, mode: str, device: torch.device | str) -> nn.Module:
    """Move `model` to `device` and quantize it in place with `mode`; returns it."""
    check_quantization(mode, device)
    device = torch.device(device)
    model.to(device)
    if QUANT_MODES[mode] is not None:
        QUANT_MODES[mode](model, device)
    return model
