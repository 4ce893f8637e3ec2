"""Importance criteria: one score per unit, for every group of a unit kind (`units.UnitKind`).

- weight (default; the reference's): the kind's weight energy, no data.
- activation: E‖a_u‖₂ · ‖W_out[:, u]‖_F: the unit's output (its features of the consumer's input: o_proj for a
  head, down_proj for a neuron) averaged over every calibration token, times the consumer's columns it feeds.
- taylor: Σ |w · ∂L/∂w| over the unit's parameters, the cross-entropy's gradient accumulated over the calibration
  batches (their labels, else the model's own predictions): the first-order loss change when the unit is zeroed.

A kind with its own data-aware score (blocks) uses it under every criterion. Calibration batches are
`(pixel_values, labels or None)`, preprocessed, on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pcamx.compress.surgery import LowRankLinear, dense_weight

if TYPE_CHECKING:
    from pcamx.compress.units import UnitKind

CalibBatch = tuple[torch.Tensor, torch.Tensor | None]
Scores = dict[str, torch.Tensor]


def _require(kind: UnitKind, criterion: str, batches: Sequence[CalibBatch] | None) -> Sequence[CalibBatch]:
    if not batches:
        raise ValueError(f"prune.criterion={criterion} scores {kind.name} from calibration batches; "
                         "none were given (prune.calib_batches must be >= 1)")
    if kind.consumers is None or kind.producers is None or kind.width is None:
        raise ValueError(f"{kind.name} units cannot be scored by {criterion}")
    return batches


def _columns(layer: nn.Linear | LowRankLinear) -> nn.Parameter:
    """The weight whose columns are the layer's input features."""
    return layer.down.weight if isinstance(layer, LowRankLinear) else layer.weight


def _rows(layer: nn.Linear | LowRankLinear) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The weight whose rows are the layer's output features, and the bias."""
    out = layer.up if isinstance(layer, LowRankLinear) else layer
    return out.weight, out.bias


def weight(model: nn.Module, kind: UnitKind, batches: Sequence[CalibBatch] | None = None) -> Scores:
    if kind.weight_scores is None:
        raise ValueError(f"{kind.name} units have no weight-only score")
    return {name: kind.weight_scores(module) for name, module in kind.groups(model)}


@torch.no_grad()
def activation(model: nn.Module, kind: UnitKind, batches: Sequence[CalibBatch] | None) -> Scores:
    batches = _require(kind, "activation", batches)
    groups = kind.groups(model)
    sums = {name: torch.zeros(kind.size(m), dtype=torch.float64) for name, m in groups}
    tokens = dict.fromkeys(sums, 0)
    hooks = []

    def recorder(name: str, units: int, width: int):
        def hook(module: nn.Module, args: tuple) -> None:
            per_unit = args[0].double().reshape(-1, units, width).norm(dim=-1)  # (tokens, units)
            sums[name] += per_unit.sum(dim=0).cpu()
            tokens[name] += per_unit.shape[0]
        return hook

    for name, module in groups:
        consumer = kind.consumers(module)[0]
        hooks.append(consumer.register_forward_pre_hook(recorder(name, kind.size(module), kind.width(module))))
    was_training = model.training
    model.eval()
    try:
        for pixel_values, _ in batches:
            model(pixel_values)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    scores = {}
    for name, module in groups:
        units, width = kind.size(module), kind.width(module)
        w = dense_weight(kind.consumers(module)[0]).cpu()  # (out, units · width)
        outgoing = w.reshape(w.shape[0], units, width).pow(2).sum(dim=(0, 2)).sqrt()
        scores[name] = sums[name] / tokens[name] * outgoing
    return scores


def taylor(model: nn.Module, kind: UnitKind, batches: Sequence[CalibBatch] | None) -> Scores:
    batches = _require(kind, "taylor", batches)
    groups = kind.groups(model)
    # (parameter, dim along which units are laid out) for every parameter a unit owns.
    owned: dict[str, list[tuple[nn.Parameter, int]]] = {}
    for name, module in groups:
        entries = []
        for layer in kind.producers(module):
            w, b = _rows(layer)
            entries += [(w, 0)] + ([(b, 0)] if b is not None else [])
        entries += [(_columns(layer), 1) for layer in kind.consumers(module)]
        owned[name] = entries
    scored = {id(p) for entries in owned.values() for p, _ in entries}
    was = {id(p): (p.requires_grad, p.grad) for p in model.parameters()}
    for p in model.parameters():  # gradients of the scored weights only, from zero; the others' stay as they were
        p.requires_grad_(id(p) in scored)
        p.grad = None if id(p) in scored else p.grad
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for pixel_values, labels in batches:
                logits = model(pixel_values).float()
                target = logits.argmax(dim=1) if labels is None else labels.to(logits.device)
                (F.cross_entropy(logits, target) / len(batches)).backward()
        scores = {}
        for name, module in groups:
            units, width = kind.size(module), kind.width(module)
            total = torch.zeros(units, dtype=torch.float64)
            for p, dim in owned[name]:
                contribution = (p.detach().double() * p.grad.double()).abs().movedim(dim, 0)
                total += contribution.reshape(units, width, -1).sum(dim=(1, 2)).cpu()
            scores[name] = total
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(was[id(p)][0])
            p.grad = was[id(p)][1]
    return scores


CRITERIA: dict[str, Callable[[nn.Module, UnitKind, Sequence[CalibBatch] | None], Scores]] = {
    "weight": weight,
    "activation": activation,
    "taylor": taylor,
}


def validate_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"prune.criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    return criterion


def unit_scores(model: nn.Module, kind: UnitKind, criterion: str,
                batches: Sequence[CalibBatch] | None = None) -> Scores:
    """Every group's unit scores under `criterion` (a kind with its own data-aware score uses that)."""
    validate_criterion(criterion)
    if kind.own_scores is not None:
        if not batches:
            raise ValueError(f"the {kind.name} step scores on calibration batches; none were given "
                             "(prune.calib_batches must be >= 1)")
        return kind.own_scores(model, [x for x, _ in batches])
    return CRITERIA[criterion](model, kind, batches)
