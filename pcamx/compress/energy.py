"""The rule every compression shares: keep the fewest units whose energies reach a fraction τ of the total.

Ties: units are ranked by a *stable* descending sort, so among equal energies the lower index is kept first.
τ = 1 keeps every unit (even zero-energy ones), so "τ = 1" always means "architecture unchanged".
At least one unit is always kept, so a layer never disappears.
"""

from __future__ import annotations

from numbers import Real

import torch

TAU_RANGE = "(0, 1]"

# Cumulative sums are compared with a tiny relative slack so that fractions meant to be exact
# (e.g. 7 of 10 at τ = 0.7) are not missed by float64 round-off in τ · total.
_RELATIVE_SLACK = 1e-12


def validate_tau(tau: object, name: str = "tau") -> float:
    """`tau` as a float, or ValueError when it is not a real number in (0, 1]."""
    if isinstance(tau, bool) or not isinstance(tau, Real) or not (0.0 < float(tau) <= 1.0):
        raise ValueError(f"{name} must be a number in {TAU_RANGE} (fraction of energy to keep), got {tau!r}")
    return float(tau)


def keep_by_energy(energies: torch.Tensor, tau: float) -> torch.Tensor:
    """Indices (ascending, i.e. original order) of the units to keep under energy fraction `tau`."""
    tau = validate_tau(tau)
    if energies.ndim != 1 or energies.numel() == 0:
        raise ValueError(f"energies must be a non-empty 1-D tensor, got shape {tuple(energies.shape)}")
    values = energies.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError("energies must be finite and non-negative")
    count = values.numel()
    if tau == 1.0:
        return torch.arange(count, dtype=torch.long)

    sorted_values, order = torch.sort(values, descending=True, stable=True)
    total = float(sorted_values.sum())
    if total == 0.0:
        kept = 1
    else:
        cumulative = torch.cumsum(sorted_values, dim=0)
        target = tau * total * (1.0 - _RELATIVE_SLACK)
        reached = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).item())
        kept = min(count, reached + 1)
    return torch.sort(order[:kept]).values


def kept_fraction(energies: torch.Tensor, kept: torch.Tensor) -> float:
    """Share of the total energy held by the kept units (1.0 when all energies are zero)."""
    values = energies.detach().to(device="cpu", dtype=torch.float64)
    total = float(values.sum())
    return 1.0 if total == 0.0 else float(values[kept].sum()) / total
