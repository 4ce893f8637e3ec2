"""MLP-neuron pruning: drop the hidden neurons that carry the least energy through each block's MLP.

Dropping neuron i is exactly the same as zeroing column i of down_proj. Its energy is
e_i = (‖W_up[i, :]‖₂ · ‖W_down[:, i]‖₂)², a bound on how much it can move the block's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTGatedMLP, DINOv3ViTMLP

from pcamx.compress.surgery import dense_weight, keep_input_columns, keep_output_rows, require_linear
from pcamx.compress.units import UnitKind, prune_units

MLP_TYPES = (DINOv3ViTMLP, DINOv3ViTGatedMLP)


def mlp_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every DINOv3 MLP module in `model` (a PCamClassifier or a bare DINOv3ViTModel), in order."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, MLP_TYPES)]
    if not blocks:
        raise ValueError(f"no DINOv3 MLP modules found in {type(model).__name__}")
    return blocks


def mlp_width(mlp: nn.Module) -> int:
    return require_linear(mlp.up_proj, "up_proj").out_features


def neuron_energies(mlp: nn.Module) -> torch.Tensor:
    """e_i = (‖W_up[i, :]‖ · ‖W_down[:, i]‖)² for each hidden neuron i, in float64."""
    up = dense_weight(require_linear(mlp.up_proj, "up_proj"))
    down = dense_weight(require_linear(mlp.down_proj, "down_proj"))
    return up.pow(2).sum(dim=1) * down.pow(2).sum(dim=0)


def keep_mlp_neurons(mlp: nn.Module, neurons: Sequence[int] | torch.Tensor) -> None:
    """Keep only `neurons` (original order): up (and gate) output rows, down_proj input columns."""
    neurons = torch.as_tensor(neurons, dtype=torch.long)
    if neurons.numel() == 0:
        raise ValueError("at least one MLP neuron must be kept")
    keep_output_rows(require_linear(mlp.up_proj, "up_proj"), neurons)
    if isinstance(mlp, DINOv3ViTGatedMLP):
        keep_output_rows(require_linear(mlp.gate_proj, "gate_proj"), neurons)
    keep_input_columns(require_linear(mlp.down_proj, "down_proj"), neurons)
    mlp.intermediate_size = neurons.numel()


def prune_mlp_neurons(model: nn.Module, tau: float) -> list[dict]:
    """Prune each block's MLP to the fewest neurons that hold a fraction `tau` of the neuron energy."""
    return prune_units(model, MLP, tau)


MLP = UnitKind(
    name="mlp",
    groups=mlp_blocks,
    size=mlp_width,
    keep=keep_mlp_neurons,
    weight_scores=neuron_energies,
    producers=lambda mlp: [mlp.up_proj, *([mlp.gate_proj] if isinstance(mlp, DINOv3ViTGatedMLP) else [])],
    consumers=lambda mlp: [mlp.down_proj],
    width=lambda mlp: 1,
)
