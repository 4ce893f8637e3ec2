"""Compression to a budget: the largest model a plan makes within at most N GFLOPs or parameters.

Every step keeps more as τ grows, so the model's cost is a non-decreasing step function of one τ shared by
all steps; bisection finds the largest τ whose model fits. The search stops when the models on either side
of the boundary differ by at most one unit (head, neuron, block or rank), or when τ is pinned to 1e-7.
With SVD in the plan the cost can jump at one τ (a layer whose rank no longer saves parameters goes back to
dense, and layers with similar spectra do so together): the result is then the largest model below the jump.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from pcamx.compress.chain import STEPS, PrunePlan, run_plan
from pcamx.compress.importance import CalibBatch

log = logging.getLogger(__name__)

TAU_FLOOR = 1e-9  # keeps one unit per group (one rank per factorized layer): the smallest model of a plan
TAU_RESOLUTION = 1e-7  # a unit holding less than this share of its group's score is not worth more trials

Measure = Callable[[nn.Module], dict[str, float]]  # model → {"gflops": …, "params": …}


def unit_count(model: nn.Module, p: PrunePlan) -> int:
    """The units the plan's steps could still remove (heads, neurons, blocks, ranks): the search's grain."""
    return sum(STEPS[step].units(model, p) for step in p.steps)


def compress_to_budget(model: nn.Module, p: PrunePlan, measure: Measure,
                       calibration: Sequence[CalibBatch] | None = None) -> tuple[nn.Module, dict, dict[str, Any]]:
    """(compressed copy of `model`, each step's report, the search's result for metrics.json).

    Fails with the smallest reachable cost when even τ → 0 does not fit the budget."""
    if p.budget is None:
        raise ValueError("this plan has no budget (prune.target_ratio, target_gflops or target_params)")
    budget = p.budget
    full = measure(model)
    limit = budget.limit(full)

    def trial(tau: float) -> tuple[nn.Module, dict, dict[str, float]]:
        candidate = copy.deepcopy(model)
        report = run_plan(candidate, p.with_tau(tau), calibration)
        return candidate, report, measure(candidate)

    best = trial(1.0)
    lo_tau, steps = 1.0, 1
    if best[2][budget.measure] > limit:
        floor = trial(TAU_FLOOR)
        steps += 1
        if floor[2][budget.measure] > limit:
            raise ValueError(
                f"prune.{budget.key}={budget.value:g} is out of reach: the smallest model the steps "
                f"{list(p.steps)} can make has {floor[2][budget.measure]:.6g} {budget.measure} "
                f"(uncompressed: {full[budget.measure]:.6g}; budget: {limit:.6g}). Allow more, or add steps "
                f"(prune=all, prune.order with blocks).")
        best, lo_tau, hi_tau = floor, TAU_FLOOR, 1.0
        units = lambda m: unit_count(m, p)  # noqa: E731
        hi_units = units(model)
        while hi_tau - lo_tau > TAU_RESOLUTION and hi_units - units(best[0]) > 1:
            mid = (lo_tau + hi_tau) / 2
            candidate = trial(mid)
            steps += 1
            if candidate[2][budget.measure] <= limit:
                best, lo_tau = candidate, mid
            else:
                hi_tau, hi_units = mid, units(candidate[0])
    compressed, report, achieved = best
    result = {
        "tau": dict.fromkeys(p.steps, lo_tau),
        "achieved": {**{k: achieved[k] for k in ("gflops", "params")},
                     **{f"{k}_ratio": round(achieved[k] / full[k], 6) for k in ("gflops", "params") if full[k]}},
        "limit": {budget.measure: limit},
        "search_trials": steps,
    }
    log.info("budget %s=%g: τ=%.6g keeps %.4g %s of %.4g (%d trials)", budget.key, budget.value, lo_tau,
             achieved[budget.measure], budget.measure, full[budget.measure], steps)
    return compressed, report, result
