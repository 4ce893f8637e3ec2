"""Compressed checkpoints: weights plus the JSON description needed to rebuild the pruned shapes exactly.

A compressed model no longer matches its DINOv3 config (fewer heads, narrower MLPs, factorized linears),
so `architecture.json` records those shapes and `load_compressed` re-applies them to a freshly built
model, without recomputing any energies, before loading `model.safetensors` strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer

from pcamx.compress.blocks import KEPT_ATTR, encoders, keep_blocks, kept_blocks
from pcamx.compress.heads import keep_attention_heads
from pcamx.compress.mlp import keep_mlp_neurons
from pcamx.compress.svd import LowRankLinear
from pcamx.model import PCamClassifier, build_classifier
from pcamx.runtime import disk

WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.json"
SPEC_FORMAT = 1
_METADATA = {"format": "pt"}


class CheckpointMismatchError(ValueError):
    """The weights in a compressed checkpoint do not fit the architecture it records."""


def _blocks(backbone: nn.Module) -> list[DINOv3ViTLayer]:
    return [m for m in backbone.modules() if isinstance(m, DINOv3ViTLayer)]


def _layer_spec(layer: DINOv3ViTLayer) -> dict[str, Any]:
    return {
        "num_heads": layer.attention.num_heads,
        "mlp_width": layer.mlp.up_proj.out_features,
        "low_rank": {name: m.rank for name, m in layer.named_modules() if isinstance(m, LowRankLinear)},
    }


def architecture_spec(model: PCamClassifier) -> dict[str, Any]:
    """JSON-ready description of `model`'s (possibly compressed) architecture."""
    if not isinstance(model, PCamClassifier):
        raise TypeError(f"expected a PCamClassifier, got {type(model).__name__}")
    config = model.backbone.config
    (_, encoder), = encoders(model.backbone)
    removed = {"blocks": kept_blocks(encoder)} if hasattr(encoder, KEPT_ATTR) else {}
    return {
        "format": SPEC_FORMAT,
        "backbone_config": json.loads(config.to_json_string(use_diff=False)),
        "attn_implementation": getattr(config, "_attn_implementation", None) or "sdpa",
        "dtype": str(model.head.weight.dtype).removeprefix("torch."),
        "num_classes": model.head.out_features,
        "layers": [_layer_spec(layer) for layer in _blocks(model.backbone)],
        **removed,  # the original indices of the blocks left, when whole blocks were removed
    }


def save_compressed(model: PCamClassifier, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `model.safetensors` and `architecture.json` (plus `extra` under "extra") into `directory`."""
    spec = architecture_spec(model)
    if extra is not None:
        spec["extra"] = extra
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}

    # Weights first, so a new directory never holds an architecture.json without its weights; the spec
    # records their sha256, checked on load.
    with disk.atomic_path(directory / WEIGHTS_FILE, disk.tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata=_METADATA)
        spec["weights_sha256"] = disk.sha256_file(tmp)
    disk.write_text(directory / ARCHITECTURE_FILE, json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return directory



def update_extra(directory: str | os.PathLike, **entries: Any) -> Path:
    """Add `entries` to the "extra" of a compressed checkpoint's architecture.json (weights untouched)."""
    path = Path(directory) / ARCHITECTURE_FILE
    spec = _read_spec(path)
    spec["extra"] = {**(spec.get("extra") or {}), **entries}
    disk.write_text(path, json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return path


def apply_architecture(backbone: DINOv3ViTModel, layers: list[dict[str, Any]],
                       kept: list[int] | None = None) -> None:
    """Give a full-size `backbone` the recorded depth (`kept`: original indices of the blocks left) and
    per-layer shapes (weights are left to be loaded)."""
    if kept is not None:
        (_, encoder), = encoders(backbone)
        keep_blocks(encoder, kept)
    blocks = _blocks(backbone)
    if len(blocks) != len(layers):
        raise ValueError(f"spec describes {len(layers)} layers, the config builds {len(blocks)}")
    for index, (block, layer) in enumerate(zip(blocks, layers, strict=True)):
        num_heads, width = int(layer["num_heads"]), int(layer["mlp_width"])
        full_heads, full_width = block.attention.num_heads, block.mlp.up_proj.out_features
        if not (1 <= num_heads <= full_heads and 1 <= width <= full_width):
            raise ValueError(f"layer {index}: {num_heads} heads / MLP width {width} exceed the config's")
        if num_heads < block.attention.num_heads:
            keep_attention_heads(block.attention, range(num_heads))
        if width < block.mlp.up_proj.out_features:
            keep_mlp_neurons(block.mlp, range(width))
        for path, rank in layer["low_rank"].items():
            parent_path, _, attr = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            linear = getattr(parent, attr)
            weight = linear.weight
            setattr(
                parent,
                attr,
                LowRankLinear(
                    linear.in_features,
                    linear.out_features,
                    int(rank),
                    bias=linear.bias is not None,
                    device=weight.device,
                    dtype=weight.dtype,
                ),
            )


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    missing = [k for k in ("format", "backbone_config", "num_classes", "layers") if k not in spec]
    if missing:
        raise ValueError(f"{path} is missing {missing}; is it a pcamx compressed checkpoint?")
    if spec["format"] != SPEC_FORMAT:
        raise ValueError(f"{path} has spec format {spec['format']}, this version reads {SPEC_FORMAT}")
    return spec


def load_compressed(directory: str | os.PathLike, device: str | torch.device = "cpu") -> PCamClassifier:
    """Rebuild the exact compressed PCamClassifier saved by `save_compressed` in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"compressed checkpoint directory not found: {directory}")
    spec_path, weights_path = directory / ARCHITECTURE_FILE, directory / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"compressed checkpoint is missing {path}")
    spec = _read_spec(spec_path)
    recorded = spec.get("weights_sha256")
    if recorded and disk.sha256_file(weights_path) != recorded:
        raise CheckpointMismatchError(
            f"{weights_path} is damaged: its sha256 differs from the one recorded in {spec_path} when it was saved"
        )

    model = build_classifier(DINOv3ViTConfig.from_dict(spec["backbone_config"]), int(spec["num_classes"]))
    try:
        apply_architecture(model.backbone, spec["layers"], spec.get("blocks"))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointMismatchError(
            f"{spec_path} does not describe a buildable architecture: {err}"
        ) from err
    model.to(dtype=getattr(torch, spec.get("dtype", "float32")))

    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as err:  # safetensors' own error type; a damaged header or truncated file
        raise CheckpointMismatchError(f"{weights_path} could not be read: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointMismatchError(
            f"weights in {weights_path} do not match the architecture in {spec_path}: {err}"
        ) from err
    return model.to(device).eval()
