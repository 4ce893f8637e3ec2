"""The training schedule and loss against closed forms, and the learning rate a real run uses at every step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_config, fast_overrides, method_config, tiny_model
from pcamx import pipeline
from pcamx.data.transforms import preprocess
from pcamx.training import loop as train
from pcamx.training.loop import train_step
from pcamx.training.losses import distillation_loss, smoothed_ce_from_probs
from pcamx.training.methods import apply_method
from pcamx.training.optim import build_optimizer, warmup_cosine


def closed_form(step: int, warmup: int, total: int, zero_start: bool = False) -> float:
    if step < warmup:
        return (step if zero_start else step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


@pytest.mark.parametrize("step,expected", [
    (0, 0.1),            # the first warmup step already trains: 1/10
    (4, 0.5),
    (9, 1.0),            # the last warmup step reaches the peak
    (10, 1.0),           # the cosine starts at its top
    (60, 0.5),           # half way through the cosine
    (109, 0.5 * (1 + math.cos(math.pi * 99 / 100))),  # the last step: almost 0, not 10 % of the peak
    (110, 0.0),
    (200, 0.0),          # past the end it stays at 0
])
def test_warmup_cosine_at_its_edges(step: int, expected: float) -> None:
    assert warmup_cosine(step, 10, 110) == pytest.approx(expected, abs=1e-12)


def test_zero_start_warmup_begins_at_zero() -> None:
    assert [warmup_cosine(s, 4, 20, zero_start=True) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_short_run_uses_the_scheduled_learning_rate_at_every_step(small_pcam: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[list[float]] = []
    real_step = train.train_step

    def recording(forward, optimizer, *args, **kwargs):
        used.append([group["lr"] for group in optimizer.param_groups])
        return real_step(forward, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", recording)
    cfg = compose_config(*fast_overrides(small_pcam, "method=fullft", "train.epochs=3", "train.warmup_steps=3",
                                         "train.lr=0.01", "method.lr_head=0.02"))
    pipeline.run(cfg, run_dir=tmp_path)
    total = 3 * 4  # epochs × debug's 4 steps per epoch
    assert len(used) == total
    for step, lrs in enumerate(used):
        scale = closed_form(step, 3, total)
        assert sorted(set(lrs)) == pytest.approx(sorted({0.01 * scale, 0.02 * scale}), abs=1e-15), step


def test_validation_loss_is_the_label_smoothed_cross_entropy() -> None:
    labels = np.array([0, 1, 1])
    probs = np.array([0.2, 0.7, 0.4])
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64))
    for smoothing in (0.0, 0.05, 0.3):
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor(labels), label_smoothing=smoothing)
        assert smoothed_ce_from_probs(labels, probs, smoothing) == pytest.approx(expected.item(), rel=1e-12)


def test_validation_loss_of_saturated_probabilities_is_clipped_not_infinite() -> None:
    # Fully wrong and fully right at probability 0/1: log is taken of max(p, 1e-7), the metrics' NLL clip.
    labels, probs = np.array([0, 1]), np.array([1.0, 1.0])
    log_eps = np.log(1e-7)
    by_hand = np.mean([(1 - 0.1) * -log_eps - 0.1 * (log_eps + 0) / 2, (1 - 0.1) * 0 - 0.1 * (log_eps + 0) / 2])
    assert smoothed_ce_from_probs(labels, probs, 0.1) == pytest.approx(by_hand, rel=1e-12)


def test_distillation_term_is_t_squared_kl_of_the_softened_distributions() -> None:
    student = torch.tensor([[2.0, -1.0], [0.5, 0.3]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0], [-0.2, 0.9]], dtype=torch.float64)
    t = 2.5
    p_t, p_s = torch.softmax(teacher / t, -1), torch.softmax(student / t, -1)
    by_hand = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * t * t  # KL(teacher ‖ student), batch mean
    assert distillation_loss(student, teacher, t).item() == pytest.approx(by_hand.item(), rel=1e-12)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-15)


def test_warmup_cosine_with_one_step_after_the_warmup() -> None:
    # total − warmup = 1: that step is the cosine's end (progress 1 → 0), not its middle.
    assert warmup_cosine(4, 4, 5) == pytest.approx(1.0)
    assert warmup_cosine(5, 4, 5) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine(3, 0, 2) == pytest.approx(0.0, abs=1e-15)  # past the end it stays at 0


# ---------------------------------------------------------------- each training option changes the step


def reference_step(model, groups: list[dict], x: torch.Tensor, labels: torch.Tensor, smoothing: float,
                   clip: float) -> tuple[float, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Independent truth for one step: the loss as −Σ_k q_k log p_k with q the smoothed one-hot target, the
    gradient clipped to a global norm `clip`, and AdamW's first update written out (m̂ = g, v̂ = g²):
    p ← p·(1 − lr·wd) − lr·g / (|g| + ε). Returns (loss, clipped gradients, updated parameters) by id."""
    logp = torch.log_softmax(model(x).double(), dim=-1)
    q = torch.full_like(logp, smoothing / 2)
    q[torch.arange(len(labels)), labels] += 1 - smoothing
    loss = -(q * logp).sum(-1).mean()
    params = [p for g in groups for p in g["params"]]
    # A parameter off the forward path (the mask token) has no gradient; AdamW leaves it alone, decay included.
    grads = {id(p): g for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True)
             if g is not None}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    scale = min(1.0, clip / (norm.item() + 1e-6)) if clip else 1.0
    grads = {k: g * scale for k, g in grads.items()}
    updated = {}
    for group in groups:
        lr, wd, eps = group["lr"], group["weight_decay"], 1e-8
        for p in group["params"]:
            g = grads.get(id(p), torch.zeros_like(p)).double()
            updated[id(p)] = p.detach().double() * (1 - lr * wd if id(p) in grads else 1) - lr * g / (g.abs() + eps)
    return loss.item(), grads, updated


@pytest.mark.parametrize("smoothing,clip,decay_all", [(0.0, 0.0, False), (0.3, 0.05, True)])
def test_the_step_applies_smoothing_clipping_and_each_groups_rate_and_decay(smoothing: float, clip: float,
                                                                             decay_all: bool) -> None:
    model = tiny_model(head_std=1.0).train()
    # Head and backbone at their own rates and decays; with decay_all_params, norms and biases decay too.
    method = method_config("fullft", lr_head=3e-2, wd_head=0.5, lr_backbone=1e-3, wd_backbone=0.2)
    groups = apply_method(model, method, 1e-4, 0.1, decay_all)
    rates = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    norm_weight = model.backbone.model.layer[0].norm1.weight
    assert rates[id(model.head.weight)] == (3e-2, 0.5) and rates[id(norm_weight)] == (1e-3, 0.2 if decay_all else 0.0)
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    # DINOv3 jitters its RoPE positions in training mode, from torch's RNG: both forwards draw the same.
    torch.manual_seed(7)
    expected_loss, grads, updated = reference_step(model, groups, preprocess(images, 32), labels, smoothing, clip)
    optimizer = build_optimizer(groups, torch.device("cpu"), 1e-4)
    torch.manual_seed(7)
    loss, _, grad_norm = train_step(model, optimizer, images, labels, resolution=32, augment=False,
                                    generator=torch.Generator(), precision="fp32", label_smoothing=smoothing,
                                    grad_clip=clip)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    clipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for g in groups for p in g["params"] if p.grad is not None))
    assert clipped.item() == pytest.approx(min(grad_norm.item(), clip) if clip else grad_norm.item(), rel=1e-4)
    for group in groups:
        for p in group["params"]:
            assert (p.grad is None) == (id(p) not in grads)
            if p.grad is not None:
                torch.testing.assert_close(p.grad.double(), grads[id(p)].double(), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(p.detach().double(), updated[id(p)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zero_start", [False, True])
def test_the_loop_passes_every_training_option_to_the_step(small_pcam: Path, tmp_path: Path, zero_start: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[dict] = []
    real_step = train.train_step

    def recording(forward, optimizer, *args, **kwargs):
        used.append({"lrs": sorted({g["lr"] for g in optimizer.param_groups}), **kwargs})
        return real_step(forward, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", recording)
    cfg = compose_config(*fast_overrides(small_pcam, "method=fullft", "train.epochs=2", "train.warmup_steps=3",
                                         "train.lr=0.01", "method.lr_head=0.02", "train.label_smoothing=0.1",
                                         "train.grad_clip=0.5", f"train.warmup_zero_start={zero_start}"))
    pipeline.run(cfg, run_dir=tmp_path)
    total = 2 * 4  # epochs × debug's 4 steps per epoch
    assert len(used) == total
    for step, call in enumerate(used):
        scale = closed_form(step, 3, total, zero_start)
        assert call["lrs"] == pytest.approx(sorted({0.01 * scale, 0.02 * scale}), abs=1e-15), step
        assert (call["label_smoothing"], call["grad_clip"]) == (0.1, 0.5)
