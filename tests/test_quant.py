"""Post-training quantization modes: outputs stay close to float32, bad requests fail clearly."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from pcamx.compress.chain import compress
from pcamx.compress.quant import quantize

CPU = torch.device("cpu")


def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def probabilities(model: torch.nn.Module, device: torch.device = CPU) -> torch.Tensor:
    return model(images().to(device)).float().softmax(dim=-1).cpu()


def test_none_moves_and_leaves_outputs_unchanged():
    model = tiny_model(head_std=1.0)
    expected = probabilities(model)
    torch.testing.assert_close(probabilities(quantize(model, "none", CPU)), expected, atol=0, rtol=0)


def test_bf16_runs_in_bf16_and_stays_close_to_f32():
    model = tiny_model(head_std=1.0)
    expected = probabilities(model)
    quantized = quantize(copy.deepcopy(model), "bf16", CPU)
    head_inputs = []
    quantized.head.register_forward_hook(lambda module, args, out: head_inputs.append(args[0].dtype))
    with torch.no_grad():
        logits = quantized(images())  # float32 pixels: the backbone casts them itself
    floating = [(n, t) for n, t in [*quantized.named_parameters(), *quantized.named_buffers()]
                if t.is_floating_point()]
    assert len(floating) == len(list(quantized.named_parameters())) + sum(
        1 for _, b in quantized.named_buffers() if b.is_floating_point())
    assert [n for n, t in floating if t.dtype != torch.bfloat16] == []  # every parameter and float buffer
    assert head_inputs == [torch.bfloat16] and logits.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (relative error ≈ 2⁻⁹ ≈ 0.2% per rounding); through two blocks and the
    # head that compounds to about 1% of the logits, and probabilities move less than the logits do.
    torch.testing.assert_close(logits.float().softmax(-1), expected, atol=2e-2, rtol=0)


def test_int8_on_cpu_is_dynamic_and_stays_close_to_f32():
    pytest.importorskip("torchao")
    model = tiny_model(head_std=1.0)
    compress(model, "all", {"heads": 0.9, "mlp": 0.9, "svd": 0.5})  # quantizing must also cover LowRankLinear's halves
    expected = probabilities(model)
    quantized = quantize(model, "int8", CPU)
    linears = [m for m in quantized.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight) is not torch.nn.Parameter for m in linears)  # torchao tensors now
    # Per-channel int8 weights and per-token int8 activations each carry ≈ 0.4% relative error (1/255 of
    # the range); compounded over the tiny model that stays within a few percent of the logits (0.4% seen).
    torch.testing.assert_close(probabilities(quantized), expected, atol=3e-2, rtol=0)


def test_unknown_mode_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: none, bf16, int8"):
        quantize(tiny_model(head_std=1.0), "fp8", CPU)


def test_int8_off_cpu_and_cuda_is_refused_before_anything_moves():
    model = tiny_model(head_std=1.0)
    with pytest.raises(ValueError, match="quant=int8 runs on cpu or cuda, not mps"):
        quantize(model, "int8", torch.device("mps"))
    assert next(model.parameters()).device == CPU


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine really has an MPS device")
def test_bf16_on_an_unusable_device_is_refused():
    with pytest.raises(RuntimeError, match="quant=bf16 is not supported on mps"):
        quantize(tiny_model(head_std=1.0), "bf16", torch.device("mps"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine really has CUDA")
@pytest.mark.parametrize("mode", ["none", "bf16", "int8"])
def test_cuda_without_cuda_is_refused(mode):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        quantize(tiny_model(head_std=1.0), mode, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("mode, atol", [("bf16", 2e-2), ("int8", 3e-2)])
def test_cuda_modes_stay_close_to_f32(mode, atol):
    if mode == "int8":
        pytest.importorskip("torchao")
    model = tiny_model(head_std=1.0)
    expected = probabilities(model)
    cuda = torch.device("cuda")
    torch.testing.assert_close(probabilities(quantize(model, mode, cuda), cuda), expected, atol=atol, rtol=0)
