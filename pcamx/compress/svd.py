"""Truncated SVD: replace a linear W (out × in) by two thinner ones, x → x V_r → (U_r Σ_r) + b.

The rank r is the fewest singular values whose squares reach a fraction τ of ‖W‖²_F (the energy rule
shared with pruning). A layer is only factorized when that saves parameters: r · (in + out) < in · out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer

from pcamx.compress.energy import keep_by_energy, kept_fraction, validate_tau
from pcamx.compress.surgery import LowRankLinear

if TYPE_CHECKING:
    from pcamx.compress.chain import PrunePlan
    from pcamx.compress.importance import CalibBatch

# The linears of a DINOv3 block that can be factorized: what prune.svd_targets=all means.
SVD_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def resolve_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """`targets` as a tuple of projection names; "all" means every name in SVD_TARGETS."""
    if isinstance(targets, str):
        targets = SVD_TARGETS if targets == "all" else (targets,)
    resolved = tuple(targets)
    unknown = [t for t in resolved if t not in SVD_TARGETS]
    if unknown or not resolved:
        raise ValueError(f"unknown SVD targets {unknown}; allowed: 'all' or any of {list(SVD_TARGETS)}")
    return resolved


def svd_candidates(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, attribute, linear) for every plain nn.Linear named in `targets` in a block."""
    wanted = set(targets)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DINOv3ViTLayer)]
    if not layers:
        raise ValueError(f"no DINOv3ViTLayer modules found in {type(model).__name__}")
    found = []
    for layer_name, layer in layers:
        for name, parent in layer.named_modules():
            for attr, child in parent.named_children():
                # Already factorized layers are LowRankLinear, not nn.Linear, and are left alone.
                if attr in wanted and type(child) is nn.Linear:
                    qualified = ".".join(p for p in (layer_name, name, attr) if p)
                    found.append((qualified, parent, attr, child))
    return found


@contextmanager
def _single_cpu_thread() -> Iterator[None]:
    # MKL's multi-threaded SVD slows down 30-100x when its cores are shared with another busy process
    # (seen on 2-core machines); these matrices are small enough that one thread takes ~50 ms each.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def low_rank_factors(weight: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down weight r × in, up weight out × r, kept energy) in float64 for energy fraction `tau`."""
    matrix = weight.detach().to(torch.float64)
    if matrix.device.type == "cpu":
        with _single_cpu_thread():
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energies = s.pow(2)
    # Singular values come sorted descending, so the kept set is always the leading r of them.
    rank = keep_by_energy(energies, tau).numel()
    kept = torch.arange(rank)
    return vh[:rank], u[:, :rank] * s[:rank], kept_fraction(energies, kept)


@torch.no_grad()
def factorize_linear(linear: nn.Linear, down: torch.Tensor, up: torch.Tensor) -> LowRankLinear:
    weight = linear.weight
    low_rank = LowRankLinear(
        linear.in_features,
        linear.out_features,
        down.shape[0],
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    low_rank.down.weight.copy_(down.to(weight.dtype))
    low_rank.up.weight.copy_(up.to(weight.dtype))
    if linear.bias is not None:
        low_rank.up.bias.copy_(linear.bias)
    low_rank.requires_grad_(weight.requires_grad)
    return low_rank


def truncated_svd(model: nn.Module, tau: float, targets: str | Iterable[str]) -> list[dict]:
    """Factorize each targeted linear of every block at energy fraction `tau` where that saves parameters."""
    tau = validate_tau(tau)
    targets = resolve_targets(targets)
    report = []
    for name, parent, attr, linear in svd_candidates(model, targets):
        full_rank = min(linear.in_features, linear.out_features)
        down, up, energy = low_rank_factors(linear.weight, tau)
        rank = down.shape[0]
        dense_params = linear.in_features * linear.out_features
        low_rank_params = rank * (linear.in_features + linear.out_features)
        replaced = low_rank_params < dense_params
        if replaced:
            setattr(parent, attr, factorize_linear(linear, down, up))
        report.append(
            {
                "layer": name,
                "before": full_rank,
                "after": rank if replaced else full_rank,
                "rank_for_tau": rank,
                "replaced": replaced,
                "weight_params_before": dense_params,
                "weight_params_after": low_rank_params if replaced else dense_params,
                "kept_energy": energy if replaced else 1.0,
            }
        )
    return report


class TruncatedSVD:
    """Truncated SVD as a compression step (`chain.STEPS["svd"]`, see `units.Step`): its units are ranks."""

    name = "svd"
    outer = False

    def compress(self, model: nn.Module, tau: float, plan: PrunePlan,
                 calibration: Sequence[CalibBatch] | None) -> list[dict]:
        return truncated_svd(model, tau, plan.svd_targets)

    def units(self, model: nn.Module, plan: PrunePlan) -> int:
        # A dense target counts its full rank, so a layer that falls back to dense is many units, not fewer.
        dense = sum(min(lin.in_features, lin.out_features) for *_, lin in svd_candidates(model, plan.svd_targets))
        return dense + sum(m.rank for m in model.modules() if isinstance(m, LowRankLinear))

    def needs_calibration(self, criterion: str) -> bool:
        return False

    def shape(self, model: nn.Module) -> dict[str, int]:
        return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}

    def reshape(self, model: nn.Module, shape: Mapping[str, int]) -> None:
        for name, rank in shape.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            dense = getattr(parent, attr)
            setattr(parent, attr, LowRankLinear(dense.in_features, dense.out_features, int(rank),
                                                bias=dense.bias is not None, device=dense.weight.device,
                                                dtype=dense.weight.dtype))


SVD = TruncatedSVD()
