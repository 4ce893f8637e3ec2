"""Truncated SVD: replace a linear W (out × in) by two thinner ones, x → x V_r → (U_r Σ_r) + b.

The rank r is the fewest singular values whose squares reach a fraction τ of ‖W‖²_F (the energy rule
shared with pruning). A layer is only factorized when that saves parameters: r · (in + out) < in · out.
The row/column slicing used by pruning lives here too, because it must work on both kinds of linear:
that is what lets the three methods run in any order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer

from pcamx.compress.energy import keep_by_energy, kept_fraction, validate_tau

SVD_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


class LowRankLinear(nn.Module):
    """`up(down(x))`: a rank-`rank` stand-in for an nn.Linear(in_features, out_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def require_linear(module: nn.Module, where: str) -> nn.Linear | LowRankLinear:
    # A PEFT/LoRA wrapper (or anything else) cannot be sliced row by row without knowing its internals.
    if type(module) is not nn.Linear and not isinstance(module, LowRankLinear):
        raise TypeError(
            f"{where} is a {type(module).__name__}, expected nn.Linear or LowRankLinear "
            "(merge LoRA adapters with merge_and_unload() before compressing)"
        )
    return module


def dense_weight(module: nn.Linear | LowRankLinear) -> torch.Tensor:
    """The (out × in) matrix the layer applies, in float64 (the product of the factors if low-rank)."""
    if isinstance(module, LowRankLinear):
        return module.up.weight.detach().to(torch.float64) @ module.down.weight.detach().to(torch.float64)
    return module.weight.detach().to(torch.float64)


def _sliced(param: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
    # A fresh Parameter (not a view) so the dropped entries are freed and no optimizer state is aliased.
    index = index.to(param.device)
    return nn.Parameter(param.detach().index_select(dim, index).clone(), requires_grad=param.requires_grad)


def keep_output_rows(module: nn.Linear | LowRankLinear, rows: torch.Tensor) -> None:
    """Shrink `module` in place to the output features `rows` (weight rows and bias entries)."""
    if isinstance(module, LowRankLinear):
        keep_output_rows(module.up, rows)
    else:
        module.weight = _sliced(module.weight, 0, rows)
        if module.bias is not None:
            module.bias = _sliced(module.bias, 0, rows)
    module.out_features = rows.numel()


def keep_input_columns(module: nn.Linear | LowRankLinear, columns: torch.Tensor) -> None:
    """Shrink `module` in place to the input features `columns` (its bias is untouched)."""
    if isinstance(module, LowRankLinear):
        keep_input_columns(module.down, columns)
    else:
        module.weight = _sliced(module.weight, 1, columns)
    module.in_features = columns.numel()


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


def truncated_svd(model: nn.Module, tau: float, targets: str | Iterable[str] = SVD_TARGETS) -> list[dict]:
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
