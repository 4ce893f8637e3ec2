"""Attention-head pruning: drop the heads that contribute least to each block's output projection.

Dropping head h is exactly the same as zeroing its columns of o_proj, which is why its energy is
e_h = ‖W_o[:, S_h]‖²_F. The heads' width (head_dim) is unchanged, so RoPE and the softmax scale stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTAttention

from pcamx.compress.surgery import dense_weight, keep_input_columns, keep_output_rows, require_linear
from pcamx.compress.units import UnitKind, prune_units


def attention_blocks(model: nn.Module) -> list[tuple[str, DINOv3ViTAttention]]:
    """Every DINOv3 attention module in `model` (a PCamClassifier or a bare DINOv3ViTModel), in order."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, DINOv3ViTAttention)]
    if not blocks:
        raise ValueError(f"no DINOv3ViTAttention modules found in {type(model).__name__}")
    return blocks


def head_feature_indices(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices of `heads` in the concatenated (num_heads · head_dim) projection space."""
    offsets = torch.arange(head_dim, dtype=torch.long)
    return (heads.to(torch.long)[:, None] * head_dim + offsets[None, :]).reshape(-1)


def head_energies(attention: DINOv3ViTAttention) -> torch.Tensor:
    """e_h = ‖W_o[:, S_h]‖²_F for each head h, in float64."""
    weight = dense_weight(require_linear(attention.o_proj, "o_proj"))
    per_head = weight.reshape(weight.shape[0], attention.num_heads, attention.head_dim)
    return per_head.pow(2).sum(dim=(0, 2))


def keep_attention_heads(attention: DINOv3ViTAttention, heads: Sequence[int] | torch.Tensor) -> None:
    """Keep only `heads` (original order) of `attention`: q/k/v output rows and o_proj input columns."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    if heads.numel() == 0:
        raise ValueError("at least one attention head must be kept")
    features = head_feature_indices(heads, attention.head_dim)
    for name in ("q_proj", "k_proj", "v_proj"):
        keep_output_rows(require_linear(getattr(attention, name), name), features)
    keep_input_columns(require_linear(attention.o_proj, "o_proj"), features)
    # The forward reshapes with num_heads; head_dim and scaling are per head and stay as they are.
    attention.num_heads = heads.numel()


def prune_attention_heads(model: nn.Module, tau: float) -> list[dict]:
    """Prune each block's heads to the fewest that hold a fraction `tau` of the o_proj energy."""
    return prune_units(model, HEADS, tau)


HEADS = UnitKind(
    name="heads",
    groups=attention_blocks,
    size=lambda attention: attention.num_heads,
    keep=keep_attention_heads,
    weight_scores=head_energies,
    producers=lambda attention: [attention.q_proj, attention.k_proj, attention.v_proj],
    consumers=lambda attention: [attention.o_proj],
    width=lambda attention: attention.head_dim,
    list_kept=True,
)
