"""Unit kinds: what a pruning step removes, where the units live, how each is scored by weight and cut out.

A kind maps a model to its groups (each attention's heads, each MLP's neurons, the encoder's blocks) and says a
group's unit count, their weight score and the surgery that keeps a subset; the data-aware criteria also need the
linears holding a unit's parameters as output rows (`producers`) or input columns (`consumers`). `allocate` turns
scores into kept indices (per group, or ranked across groups) and `prune_units` applies them. Every step (a kind,
or truncated SVD) is a `Step`: run by the chain, counted by the budget search, and recorded and rebuilt by
compressed checkpoints, so a new kind is its module, one `chain.STEPS` entry and its yaml.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from pcamx.compress.energy import keep_by_energy, kept_fraction, validate_tau
from pcamx.compress.importance import CalibBatch, unit_scores
from pcamx.compress.surgery import LowRankLinear

if TYPE_CHECKING:
    from pcamx.compress.chain import PrunePlan

SCOPES = ("layer", "global")

Linear = nn.Linear | LowRankLinear


@dataclass(frozen=True)
class UnitKind:
    """One kind of prunable unit. `width` is how many consecutive features of a producer's output (and of a
    consumer's input) one unit spans: head_dim for a head, 1 for an MLP neuron."""

    name: str
    groups: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    size: Callable[[nn.Module], int]
    keep: Callable[[nn.Module, torch.Tensor], None]
    weight_scores: Callable[[nn.Module], torch.Tensor] | None = None
    producers: Callable[[nn.Module], list[Linear]] | None = None
    consumers: Callable[[nn.Module], list[Linear]] | None = None
    width: Callable[[nn.Module], int] | None = None
    # A kind scored by its own data-aware rule under every criterion: (model, pixel batches) → scores.
    own_scores: Callable[[nn.Module, list[torch.Tensor]], dict[str, torch.Tensor]] | None = None
    list_kept: bool = False  # report the kept indices (a few heads: yes; 1536 neurons per block: no)
    # What a checkpoint records of a group, and how a full-size group is given that shape again. By default the
    # unit count, re-applied by keeping the first units (the weights, loaded after, are already the kept ones).
    record: Callable[[nn.Module], Any] | None = None
    reapply: Callable[[nn.Module, Any], None] | None = None
    outer: bool = False  # its groups hold other kinds' groups (blocks hold heads): re-applied first

    def compress(self, model: nn.Module, tau: float, plan: PrunePlan,
                 calibration: Sequence[CalibBatch] | None) -> list[dict]:
        return prune_units(model, self, tau, unit_scores(model, self, plan.criterion, calibration), plan.scope)

    def units(self, model: nn.Module, plan: PrunePlan) -> int:
        return sum(self.size(group) for _, group in self.groups(model))

    def needs_calibration(self, criterion: str) -> bool:
        return self.own_scores is not None or criterion != "weight"

    def shape(self, model: nn.Module) -> dict[str, Any]:
        return {name: (self.record or self.size)(group) for name, group in self.groups(model)}

    def reshape(self, model: nn.Module, shape: Mapping[str, Any]) -> None:
        groups = dict(self.groups(model))
        unknown = sorted(set(shape) - set(groups))
        if unknown:
            raise ValueError(f"no {self.name} groups named {unknown} in this architecture")
        for name, value in shape.items():
            if self.reapply is not None:
                self.reapply(groups[name], value)
            elif not 1 <= int(value) <= self.size(groups[name]):
                raise ValueError(f"{name}: {value} {self.name} units, the architecture has "
                                 f"{self.size(groups[name])}")
            elif int(value) < self.size(groups[name]):
                self.keep(groups[name], torch.arange(int(value)))


class Step(Protocol):
    """A compression step as the chain, the budget search and compressed checkpoints see it (`chain.STEPS`)."""

    name: str
    outer: bool

    def compress(self, model: nn.Module, tau: float, plan: PrunePlan,
                 calibration: Sequence[CalibBatch] | None) -> list[dict]:
        """Compress `model` in place at energy fraction `tau`; one report row per layer."""

    def units(self, model: nn.Module, plan: PrunePlan) -> int:
        """How many units (heads, neurons, blocks, ranks) this step could still remove: the budget search's grain."""

    def needs_calibration(self, criterion: str) -> bool:
        """Whether the step scores on calibration batches under `criterion`."""

    def shape(self, model: nn.Module) -> Any:
        """A JSON-ready record of the shape this step leaves (group name → units)."""

    def reshape(self, model: nn.Module, shape: Any) -> None:
        """Give a freshly built, full-size model the recorded shape (its weights are loaded afterwards)."""


def validate_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"prune.scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return scope


def allocate(scores: Mapping[str, torch.Tensor], tau: float, scope: str) -> dict[str, torch.Tensor]:
    """Kept indices per group (ascending). `layer`: each group keeps the fewest units holding a fraction τ
    of its own total score. `global`: the units of all groups are ranked together by their share of the
    model-wide total, the fewest holding τ of it are kept, and a group left empty keeps its best unit."""
    tau, scope = validate_tau(tau), validate_scope(scope)
    if scope == "layer" or len(scores) == 1:
        return {name: keep_by_energy(s, tau) for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n].detach().to(device="cpu", dtype=torch.float64) for n in names])
    kept = torch.zeros(len(flat), dtype=torch.bool)
    kept[keep_by_energy(flat, tau)] = True
    out, start = {}, 0
    for name in names:
        n = scores[name].numel()
        mine = torch.nonzero(kept[start : start + n]).flatten()
        if mine.numel() == 0:  # never empty a block's attention or MLP
            mine = keep_by_energy(scores[name], 1e-12)
        out[name], start = mine, start + n
    return out


def prune_units(model: nn.Module, kind: UnitKind, tau: float, scores: Mapping[str, torch.Tensor] | None = None,
                scope: str = "layer") -> list[dict]:
    """Keep, in every group of `kind`, the units `allocate` picks from `scores` (default: the weight score),
    and report per group what was there, what is kept and the share of score kept."""
    groups = kind.groups(model)
    if scores is None:
        if kind.weight_scores is None:
            raise ValueError(f"{kind.name} units have no weight-only score; they need calibration data")
        scores = {name: kind.weight_scores(module) for name, module in groups}
    missing = [name for name, _ in groups if name not in scores]
    if missing:
        raise ValueError(f"no {kind.name} scores for {missing}")
    keep = allocate({name: scores[name] for name, _ in groups}, tau, scope)
    report = []
    for name, module in groups:
        before, kept = kind.size(module), keep[name]
        if kept.numel() < before:
            kind.keep(module, kept)
        entry = {"layer": name, "before": before, "after": kept.numel()}
        if kind.list_kept:
            entry["kept"] = kept.tolist()
        entry["kept_energy"] = kept_fraction(scores[name], kept)
        report.append(entry)
    return report
