"""The classifier: a Hugging Face DINOv3 backbone and a linear head on the pooled CLS token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, DINOv3ViTConfig, DINOv3ViTModel

from pcamx.runtime.errors import UserError

NUM_CLASSES = 2


class ModelLoadError(UserError, RuntimeError):
    """The backbone weights could not be loaded (gated repo, offline machine, bad path)."""


class PCamClassifier(nn.Module):
    """`backbone(pixel_values).pooler_output` (the final-norm CLS token) → linear → 2 logits."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values=pixel_values).pooler_output)

    @property
    def config(self) -> DINOv3ViTConfig:
        return self.backbone.config


# Architectures pcamx builds without a download (random init): name → DINOv3ViTConfig fields.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # facebook/dinov3-vits16-pretrain-lvd1689m's architecture.
    "vits16": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                   num_register_tokens=4, patch_size=16, image_size=224, rope_theta=100.0, key_bias=False,
                   query_bias=True, value_bias=True, proj_bias=True, mlp_bias=True, pos_embed_rescale=2.0),
    # The same family, small enough for the demo and the tests on a CPU.
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_register_tokens=4, patch_size=16, image_size=224),
}


def architecture(name: str, **overrides: Any) -> DINOv3ViTConfig:
    """The DINOv3ViTConfig of a named architecture, with `overrides` on top."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return DINOv3ViTConfig(**{**ARCHITECTURES[name], **overrides})


def build_backbone(config: DINOv3ViTConfig) -> DINOv3ViTModel:
    """A random-init DINOv3 backbone running SDPA attention: every place that builds one from a config
    (fresh models, checkpoint and compressed-checkpoint reloads, the benchmark) comes through here."""
    backbone = DINOv3ViTModel(config)
    backbone.config._attn_implementation = "sdpa"
    return backbone


def build_classifier(config: DINOv3ViTConfig, num_classes: int = NUM_CLASSES) -> PCamClassifier:
    return PCamClassifier(build_backbone(config), config.hidden_size, num_classes)


def load_backbone(name_or_path: str) -> DINOv3ViTModel:
    """`AutoModel.from_pretrained` with an error that says how to get access or work offline."""
    try:
        return AutoModel.from_pretrained(name_or_path, attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load DINOv3 weights from {name_or_path!r}: {err}\n"
            "The official DINOv3 checkpoints are gated on the Hugging Face hub. Either:\n"
            "  * accept the licence on the model page and run `huggingface-cli login`, then retry;\n"
            "  * or download the model elsewhere and point to the local directory: "
            "model.name_or_path=/path/to/dinov3-vits16;\n"
            "  * or try the pipeline without weights: model=dinov3_tiny (random init, demo only)."
        ) from err


def build_model(model_cfg: Mapping[str, Any]) -> PCamClassifier:
    """Weights from `name_or_path` (hub id or local dir); when it is null, a random-init `architecture`
    with the `config` overrides."""
    name_or_path = model_cfg["name_or_path"]
    if name_or_path:
        backbone = load_backbone(str(name_or_path))
        return PCamClassifier(backbone, backbone.config.hidden_size)
    return build_classifier(architecture(model_cfg["architecture"], **dict(model_cfg["config"] or {})))
