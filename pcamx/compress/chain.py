"""One entry point that runs the chosen compressions in order, after checking every argument."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import nn

from pcamx.compress.energy import validate_tau
from pcamx.compress.heads import prune_attention_heads
from pcamx.compress.mlp import prune_mlp_neurons
from pcamx.compress.svd import SVD_TARGETS, resolve_targets, truncated_svd

STEPS = ("heads", "mlp", "svd")
METHODS = ("none", *STEPS, "all")


def plan(
    method: str,
    tau: float | None,
    tau_heads: float | None = None,
    tau_mlp: float | None = None,
    tau_svd: float | None = None,
    order: Sequence[str] = STEPS,
    svd_targets: str | Iterable[str] = SVD_TARGETS,
) -> tuple[dict[str, float], tuple[str, ...]]:
    """Check every compression argument and return ({step: τ} in run order, svd targets).

    Runs before anything else in a run, so a bad τ fails in a second, not after hours of training."""
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; allowed: {', '.join(METHODS)}")
    order = tuple(order)
    if sorted(order) != sorted(STEPS):
        raise ValueError(f"order must list each of {list(STEPS)} exactly once, got {list(order)}")
    steps = order if method == "all" else () if method == "none" else (method,)

    # Every τ given is checked, even one the chosen method ignores: a typo should not pass silently.
    given = {"tau": tau, "tau_heads": tau_heads, "tau_mlp": tau_mlp, "tau_svd": tau_svd}
    checked = {name: validate_tau(value, name) for name, value in given.items() if value is not None}
    taus = {}
    for step in steps:
        step_tau = checked.get(f"tau_{step}", checked.get("tau"))
        if step_tau is None:
            raise ValueError(f"compression step {step!r} needs tau or tau_{step}")
        taus[step] = step_tau
    targets = resolve_targets(svd_targets) if "svd" in steps else ()
    return taus, targets


def compress(
    model: nn.Module,
    method: str,
    tau: float | None,
    tau_heads: float | None = None,
    tau_mlp: float | None = None,
    tau_svd: float | None = None,
    order: Sequence[str] = STEPS,
    svd_targets: str | Iterable[str] = SVD_TARGETS,
) -> dict[str, list[dict]]:
    """Compress `model` in place with `method` (none|heads|mlp|svd|all) and return each step's report.

    A step's own τ (tau_heads, tau_mlp, tau_svd) overrides the common `tau`. "all" runs the three steps
    in `order`. Everything is validated before the model is touched, so a bad argument leaves it intact.
    """
    taus, targets = plan(method, tau, tau_heads, tau_mlp, tau_svd, order, svd_targets)
    runners: dict[str, Callable[[float], list[dict]]] = {
        "heads": lambda t: prune_attention_heads(model, t),
        "mlp": lambda t: prune_mlp_neurons(model, t),
        "svd": lambda t: truncated_svd(model, t, targets),
    }
    return {step: runners[step](tau) for step, tau in taus.items()}
