"""The compression steps, the plan that checks every setting before the model is touched, and the chain that
runs the steps in order.

`STEPS` is the one place that says what each step removes: a unit kind (`units.UnitKind`: groups, weight
score, surgery; scored by `importance.CRITERIA`, allocated by `units.allocate`) or, for `svd`, the rank rule
of `svd.truncated_svd`; each is a `units.Step`. Adding a unit kind is one entry here plus its module (and its
conf/prune yaml); adding a criterion is one entry in `importance.CRITERIA`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from pcamx.compress.blocks import BLOCKS
from pcamx.compress.energy import validate_tau
from pcamx.compress.heads import HEADS
from pcamx.compress.importance import CalibBatch, validate_criterion
from pcamx.compress.mlp import MLP
from pcamx.compress.svd import SVD, resolve_targets
from pcamx.compress.units import Step, validate_scope
from pcamx.runtime.conf import conf_defaults

STEPS: dict[str, Step] = {"heads": HEADS, "mlp": MLP, "svd": SVD, "blocks": BLOCKS}
METHODS = ("none", *STEPS, "all")  # prune.method: one step, or `all` for prune.order's chain
TARGETS = ("target_ratio", "target_gflops", "target_params")


@dataclass(frozen=True)
class Budget:
    """At most `value` of `measure` (gflops | params), absolute or, with `relative`, as a fraction of the
    uncompressed model's."""

    key: str  # the prune.* key it came from: target_ratio | target_gflops | target_params
    value: float

    @property
    def measure(self) -> str:
        return "params" if self.key == "target_params" else "gflops"

    @property
    def relative(self) -> bool:
        return self.key == "target_ratio"

    def limit(self, uncompressed: Mapping[str, float]) -> float:
        return self.value * uncompressed[self.measure] if self.relative else self.value


@dataclass(frozen=True)
class PrunePlan:
    """A checked compression request: the steps in run order and the τ of each (None while a budget
    search has still to find it)."""

    steps: tuple[str, ...]
    tau: dict[str, float | None]
    svd_targets: tuple[str, ...]
    criterion: str
    scope: str
    budget: Budget | None
    calib_batches: int

    @property
    def needs_calibration(self) -> bool:
        """Whether any step scores units on data (a data-aware criterion, or a kind that always does)."""
        return any(STEPS[s].needs_calibration(self.criterion) for s in self.steps)

    def with_tau(self, tau: float) -> PrunePlan:
        return replace(self, tau=dict.fromkeys(self.steps, tau))

    def describe(self) -> dict[str, Any]:
        """metrics.json's `prune` block (without the budget search's result)."""
        return {"steps": list(self.steps), "tau": dict(self.tau), "criterion": self.criterion, "scope": self.scope,
                "budget": None if self.budget is None else {self.budget.key: self.budget.value},
                "svd_targets": list(self.svd_targets), "calib_batches": self.calib_batches}


def _taus(tau: float | Mapping[str, float] | None, steps: Sequence[str], searched: bool) -> dict[str, float | None]:
    # Every τ given is checked, even one the chosen method ignores: a typo should not pass silently.
    if isinstance(tau, Mapping):
        unknown = [k for k in tau if k not in STEPS]
        if unknown:
            raise ValueError(f"prune.tau names unknown steps {unknown}; allowed: {', '.join(STEPS)}")
        per_step = {k: validate_tau(v, f"prune.tau.{k}") for k, v in tau.items() if v is not None}
    elif tau is None:
        per_step = {}
    else:
        common = validate_tau(tau, "prune.tau")
        per_step = dict.fromkeys(STEPS, common)
    if searched:
        return dict.fromkeys(steps)
    missing = [s for s in steps if s not in per_step]
    if missing:
        raise ValueError(f"compression step(s) {missing} need a τ: prune.tau=<τ> for every step, "
                         f"prune.tau.{missing[0]}=<τ>, or a budget ({', '.join('prune.' + t for t in TARGETS)})")
    return {s: per_step[s] for s in steps}


def _budget(targets: Mapping[str, float | None]) -> Budget | None:
    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) > 1:
        raise ValueError(f"give one budget, not {sorted(given)}: prune.target_ratio, target_gflops or target_params")
    if not given:
        return None
    (key, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
        raise ValueError(f"prune.{key} must be a positive number, got {value!r}")
    if key == "target_ratio" and value > 1:
        raise ValueError(f"prune.target_ratio is the fraction of the uncompressed GFLOPs to keep, in (0, 1]; "
                         f"got {value!r}")
    return Budget(key, float(value))


def plan(
    method: str,
    tau: float | Mapping[str, float] | None,
    *,
    order: Sequence[str],
    svd_targets: str | Iterable[str],
    criterion: str,
    scope: str,
    calib_batches: int,
    target_ratio: float | None = None,
    target_gflops: float | None = None,
    target_params: float | None = None,
    heal_epochs: int = 0,
) -> PrunePlan:
    """Check every compression argument (the keys of conf/prune) and return the plan.

    Runs before anything else in a run, so a bad τ fails in a second, not after hours of training. Healing is
    not part of the plan (pcamx.training.heal runs it after)."""
    if method not in ("none", *STEPS, "all"):  # METHODS, with any step registered since
        raise ValueError(f"unknown compression method {method!r}; allowed: {', '.join(('none', *STEPS, 'all'))}")
    order = tuple(order)
    unknown = [s for s in order if s not in STEPS]
    if unknown or len(set(order)) != len(order) or not order:
        raise ValueError(f"prune.order must list steps of {list(STEPS)}, each at most once, got {list(order)}")
    steps = order if method == "all" else () if method == "none" else (method,)
    budget = _budget({"target_ratio": target_ratio, "target_gflops": target_gflops, "target_params": target_params})
    if budget is not None and not steps:
        raise ValueError(f"prune.{budget.key} needs a compression method (prune=heads|mlp|svd|blocks|all)")
    taus = _taus(tau, steps, searched=budget is not None)
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 0:
        raise ValueError(f"prune.calib_batches must be a whole number >= 0, got {calib_batches!r}")
    p = PrunePlan(steps=steps, tau=taus, svd_targets=resolve_targets(svd_targets) if SVD.name in steps else (),
                  criterion=validate_criterion(criterion), scope=validate_scope(scope), budget=budget,
                  calib_batches=calib_batches)
    if p.needs_calibration and calib_batches < 1:
        why = "prune.criterion=" + criterion if criterion != "weight" else "the blocks step"
        raise ValueError(f"{why} scores units on training batches: set prune.calib_batches >= 1")
    return p


def plan_from_config(prune: Mapping[str, Any]) -> PrunePlan:
    """The plan of a run's `prune` config node."""
    settings = {k: (OmegaConf.to_container(v) if isinstance(v, DictConfig | ListConfig) else v)
                for k, v in prune.items()}
    return plan(str(settings.pop("method")), settings.pop("tau"), **settings)


def run_plan(model: nn.Module, p: PrunePlan, calibration: Sequence[CalibBatch] | None = None) -> dict[str, list[dict]]:
    """Run the steps of a plan whose τ are all known, in order, each scoring the model as the previous left it."""
    if any(t is None for t in p.tau.values()):
        raise ValueError("this plan has a budget: run it with budget.compress_to_budget")
    return {step: STEPS[step].compress(model, p.tau[step], p, calibration) for step in p.steps}


def compress(model: nn.Module, method: str, tau: float | Mapping[str, float] | None = None,
             calibration: Sequence[CalibBatch] | None = None, **settings: Any) -> dict[str, list[dict]]:
    """Compress `model` in place with `method` (a step, or `all` for the chain in `order`) and return each step's
    report. `settings` are prune keys (order, svd_targets, criterion, scope); the rest are conf/prune's
    defaults. Data-aware criteria and the blocks step score on `calibration` batches. Everything is validated
    before the model is touched, so a bad argument leaves it intact. Budgets: `budget.compress_to_budget`."""
    given = {**conf_defaults("prune"), "calib_batches": len(calibration or ()), **settings}
    given.pop("method"), given.pop("tau")
    return run_plan(model, plan(method, tau, **given), calibration)
