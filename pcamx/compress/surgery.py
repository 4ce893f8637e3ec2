"""Linear layers as compression leaves them: the low-rank stand-in truncated SVD puts in place of an nn.Linear,
and the cut every kind of unit makes, keeping some output rows or input columns of either kind of linear. The
cut working on both kinds is what lets the steps run in any order.
"""

from __future__ import annotations

import torch
from torch import nn


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
