"""The device paths: the training step under bf16 autocast with the optimizer the device gets, compiled vs
eager, host → device batches, TTA on the device vs the CPU, and a whole run on CUDA.

Tests marked `cuda` need a GPU (`pytest -m cuda`, scripts/gpu_check.sh); the others run the same logic on
the CPU in the normal suite."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import compose_config, fast_overrides, method_config, tiny_model
from pcamx import pipeline
from pcamx.data import device_loader
from pcamx.data.device_loader import to_device
from pcamx.data.transforms import ColorJitter
from pcamx.evaluation.evaluate import predict_batch
from pcamx.evaluation.footprint import gflops, latency_ms, throughput_ips
from pcamx.model import PCamClassifier
from pcamx.training.loop import train_step
from pcamx.training.methods import METHODS, apply_method
from pcamx.training.optim import build_optimizer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
JITTER = ColorJitter(0.1, 0.1, 0.1, 0.03)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 96, 96, 3), dtype=torch.uint8, generator=g), torch.randint(0, 2, (n,),
                                                                                                 generator=g)


def one_step(method: str, device: torch.device, precision: str) -> tuple[PCamClassifier, dict, torch.Tensor]:
    """One optimizer step of `method`; returns the model, its parameters before, and the head's output dtype."""
    model = tiny_model(head_std=1.0)
    groups = apply_method(model, method_config(method, **({"r": 4, "alpha": 8} if method == "lora" else {})), 1e-2,
                          1e-4)
    model.to(device).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(groups, device, 1e-2)
    dtypes = []
    hook = model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    images, labels = batch()
    loss, _, _ = train_step(model, optimizer, images, labels, resolution=32, augment=True,
                         generator=torch.Generator().manual_seed(0), precision=precision, jitter=JITTER,
                         label_smoothing=0.05, grad_clip=1.0)
    hook.remove()
    assert math.isfinite(loss.item())
    return model, before, dtypes[0]


def check_trained_exactly_the_method(model: PCamClassifier, before: dict, method: str) -> None:
    """Every parameter with a gradient moved, no frozen one did, and the method's own ones trained."""
    trained = set()
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach().cpu(), before[name].cpu())
        if not p.requires_grad:
            assert not moved, name
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert moved, name
            trained.add(name)
    assert {"head.weight", "head.bias"} <= trained
    if method == "lora":
        assert any("lora_B" in n for n in trained)  # B starts at 0, so its gradient is the first to act
    if method == "fullft":
        assert any(n.endswith("q_proj.weight") for n in trained)
    if method == "head_only":
        assert trained == {"head.weight", "head.bias"}


# ---------------------------------------------------------------- CPU: the same logic in the normal suite


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_train_step_on_the_cpu(method: str) -> None:
    model, before, head_dtype = one_step(method, CPU, "bf16")
    assert head_dtype == torch.bfloat16  # the forward really ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    check_trained_exactly_the_method(model, before, method)


def test_optimizer_is_fused_on_cuda_only() -> None:
    params = [torch.nn.Parameter(torch.randn(3, 3))]
    assert not build_optimizer([{"params": params}], CPU, 1e-3).defaults["fused"]
    # The choice is by device (torch also has a CPU kernel for fused AdamW, so this constructs here).
    assert build_optimizer([{"params": params}], CUDA, 1e-3).defaults["fused"]


def test_to_device_passes_cpu_batches_through_in_order() -> None:
    batches = [batch(4, seed) for seed in range(3)] + [batch(2, 9)]
    out = list(to_device(iter(batches), CPU))
    assert len(out) == 4
    for (a, b), (c, d) in zip(out, batches, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_train_step_with_fused_adamw_on_cuda(method: str) -> None:
    model, before, head_dtype = one_step(method, CUDA, "bf16")
    assert head_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
    check_trained_exactly_the_method(model, before, method)


@pytest.mark.cuda
def test_compiled_train_step_equals_eager() -> None:
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_model(head_std=1.0)
        groups = apply_method(model, method_config("fullft"), 1e-3, 1e-4)
        model.to(CUDA).train()
        optimizer = build_optimizer(groups, CUDA, 1e-3)
        forward = torch.compile(model) if compiled else model
        generator = torch.Generator().manual_seed(0)
        losses = []
        for seed in range(3):
            images, labels = batch(16, seed)
            loss, _, _ = train_step(forward, optimizer, images, labels, resolution=32, augment=True,
                                 generator=generator, precision="fp32", jitter=JITTER, grad_clip=1.0)
            losses.append(loss.item())
        results.append((losses, {n: p.detach().cpu() for n, p in model.named_parameters()}))
    (eager_losses, eager), (compiled_losses, compiled_params) = results
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    for name, p in eager.items():
        torch.testing.assert_close(compiled_params[name], p, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.cuda
def test_pinned_prefetch_delivers_every_batch_in_order_and_reuses_two_buffers(monkeypatch) -> None:
    created = []
    original = device_loader._PinnedSlot.__init__

    def counting(self, images, labels):
        created.append(images.shape)
        original(self, images, labels)

    monkeypatch.setattr(device_loader._PinnedSlot, "__init__", counting)
    batches = [batch(64, seed) for seed in range(6)] + [batch(10, 99)]  # a smaller last batch reuses a slot
    out = []
    for images, labels in to_device(iter(batches), CUDA):
        assert images.is_cuda and labels.is_cuda
        out.append((images.float().sum().item(), labels.clone().cpu(), images.cpu()))
    assert len(out) == len(batches) and len(created) == 2
    for (total, labels, images), (want_images, want_labels) in zip(out, batches, strict=True):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
        assert total == want_images.float().sum().item()


@pytest.mark.cuda
@pytest.mark.parametrize("views", [1, 6, 8])
def test_tta_on_cuda_equals_the_cpu(views: int) -> None:
    model = tiny_model(head_std=1.0).eval()
    images, _ = batch(12)
    on_cpu = predict_batch(model, images, 48, views)
    on_gpu = predict_batch(copy.deepcopy(model).to(CUDA), images.to(CUDA), 48, views).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=2e-3, rtol=0)  # cuDNN may use TF32 for the patch conv
    bf16 = predict_batch(copy.deepcopy(model).to(CUDA), images.to(CUDA), 48, views, "bf16").cpu()
    torch.testing.assert_close(bf16, on_cpu, atol=3e-2, rtol=0)


@pytest.mark.cuda
def test_footprint_and_speed_on_cuda() -> None:
    model = tiny_model(head_std=1.0).eval()
    assert gflops(model, 32, device="cuda") == gflops(model, 32)
    model.to(CUDA)
    x = torch.randn(4, 3, 32, 32, device=CUDA)
    assert 0 < latency_ms(model, x[:1], warmup=1, iters=3) < 1e4
    assert throughput_ips(model, x, warmup=1, iters=3) > 0
    assert next(model.parameters()).is_cuda


@pytest.mark.cuda
def test_a_whole_run_on_cuda_trains_in_bf16_and_evaluates_int8(small_pcam: Path, tmp_path: Path) -> None:
    overrides = [o for o in fast_overrides(small_pcam) if not o.startswith("hardware=")]
    cfg = compose_config(*overrides, "hardware=cuda", "method=lora", "prune=all", "prune.tau=0.9", "quant=int8")
    metrics = pipeline.run(cfg, run_dir=tmp_path)
    assert metrics["device"].startswith("cuda") and metrics["status"] == "ok"
    assert (metrics["train_precision"], metrics["eval_precision"]) == ("bf16", "int8-weight-only")
    assert metrics["reference"]["eval_precision"] == "fp32"
    assert abs(metrics["auroc"] - metrics["reference"]["auroc"]) < 0.05
    assert json.loads((tmp_path / "metrics.json").read_text())["quant"] == "int8"
