"""Whole-block removal: drop transformer blocks; the residual stream passes straight through where they were.

A block's score is the mean over calibration images and tokens of 1 − cos(h_in, h_out): one that barely turns the
residual stream costs little to remove (no weight-only score exists, so this step always needs calibration data).
The config keeps the original depth; the encoder records which original blocks remain (the kind's shape).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTEncoder, DINOv3ViTLayer

from pcamx.compress.units import UnitKind

KEPT_ATTR = "kept_blocks"  # on the encoder: the original indices of the blocks it still holds


def encoders(model: nn.Module) -> list[tuple[str, DINOv3ViTEncoder]]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, DINOv3ViTEncoder)]
    if not found:
        raise ValueError(f"no DINOv3ViTEncoder found in {type(model).__name__}")
    return found


def kept_blocks(encoder: DINOv3ViTEncoder) -> list[int]:
    """The original indices of the blocks `encoder` holds (all of them until a block is removed)."""
    return list(getattr(encoder, KEPT_ATTR, range(len(encoder.layer))))


def keep_blocks(encoder: DINOv3ViTEncoder, blocks: Sequence[int] | torch.Tensor) -> None:
    """Keep only `blocks` (positions in the current encoder, any order given; kept in model order)."""
    positions = sorted(int(b) for b in torch.as_tensor(blocks, dtype=torch.long).tolist())
    if not positions:
        raise ValueError("at least one transformer block must be kept")
    if len(set(positions)) != len(positions) or not 0 <= positions[0] <= positions[-1] < len(encoder.layer):
        raise ValueError(f"block positions {positions} are not distinct positions of {len(encoder.layer)} blocks")
    original = kept_blocks(encoder)
    encoder.layer = nn.ModuleList(encoder.layer[i] for i in positions)
    setattr(encoder, KEPT_ATTR, [original[i] for i in positions])


@torch.no_grad()
def block_change(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per encoder: each block's mean 1 − cos(input, output) over every token of every calibration image."""
    encs = encoders(model)
    totals = {name: torch.zeros(len(enc.layer), dtype=torch.float64) for name, enc in encs}
    tokens = {name: 0 for name, _ in encs}
    hooks = []

    def recorder(name: str, index: int):
        def hook(module: DINOv3ViTLayer, args: tuple, output: torch.Tensor) -> None:
            cos = nn.functional.cosine_similarity(args[0].double(), output.double(), dim=-1)
            totals[name][index] += (1.0 - cos).sum().cpu()
            if index == 0:
                tokens[name] += cos.numel()
        return hook

    for name, enc in encs:
        hooks += [block.register_forward_hook(recorder(name, i)) for i, block in enumerate(enc.layer)]
    was_training = model.training
    model.eval()
    try:
        for pixel_values in batches:
            model(pixel_values)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not all(tokens.values()):
        raise ValueError("block scores need at least one calibration batch (prune.calib_batches >= 1)")
    return {name: (totals[name] / tokens[name]).clamp_min(0.0) for name, _ in encs}


BLOCKS = UnitKind(
    name="blocks",
    groups=encoders,
    size=lambda enc: len(enc.layer),
    keep=keep_blocks,
    own_scores=block_change,
    list_kept=True,
    # A full encoder's positions are the original indices: keeping the recorded ones rebuilds the depth.
    record=kept_blocks,
    reapply=lambda enc, kept: None if list(kept) == kept_blocks(enc) else keep_blocks(enc, kept),
    outer=True,
)
