"""Which parameters train, and at which learning rate: head_only, lora (via peft) and fullft."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from pcamx.model import PCamClassifier

METHODS = ("head_only", "lora", "fullft")
NORMS_BIAS = ("none", "norms", "bias", "both")
MLP_TARGETS = ("up_proj", "down_proj")


def _lr(method_cfg: Mapping[str, Any], key: str, base_lr: float) -> float:
    value = method_cfg.get(key)
    return float(base_lr if value is None else value)


def _is_norm(name: str, module_of: dict[str, nn.Module]) -> bool:
    owner = name.rsplit(".", 1)[0]
    return isinstance(module_of.get(owner), nn.LayerNorm)


def _norms_bias_params(backbone: nn.Module, which: str) -> list[nn.Parameter]:
    if which not in NORMS_BIAS:
        raise ValueError(f"train_norms_bias must be one of {NORMS_BIAS}, got {which!r}")
    if which == "none":
        return []
    module_of = dict(backbone.named_modules())
    picked = []
    for name, p in backbone.named_parameters():
        if "lora_" in name:
            continue
        norm = _is_norm(name, module_of)
        bias = name.endswith(".bias") and not norm
        if (norm and which in ("norms", "both")) or (bias and which in ("bias", "both")):
            picked.append(p)
    return picked


def lora_targets(method_cfg: Mapping[str, Any]) -> list[str]:
    targets = method_cfg.get("targets") or ["q_proj", "k_proj", "v_proj", "o_proj"]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    if method_cfg.get("include_mlp"):
        targets += [t for t in MLP_TARGETS if t not in targets]
    return targets


def lora_target_modules(backbone: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the nn.Linear modules to adapt: a target itself, or both halves of a target that
    truncated SVD replaced by a low-rank pair (so a compressed model can be healed with LoRA too)."""
    names = []
    for name, module in backbone.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and (parts[-1] in targets or (len(parts) > 1 and parts[-2] in targets)):
            names.append(name)
    if not names:
        raise ValueError(f"no linear layer of the backbone matches the LoRA targets {targets}")
    return names


def _decay_split(params: list[nn.Parameter], lr: float, weight_decay: float, label: str) -> list[dict]:
    # Standard ViT practice: no weight decay on norms, biases and tokens (1-D / token tensors).
    decay = [p for p in params if p.ndim >= 2 and not (p.ndim == 3 and p.shape[0] == 1)]  # (1, n, D): tokens
    ids = {id(p) for p in decay}
    no_decay = [p for p in params if id(p) not in ids]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": label})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{label}_no_decay"})
    return groups


def apply_method(
    model: PCamClassifier, method_cfg: Mapping[str, Any], base_lr: float, weight_decay: float
) -> list[dict]:
    """Set `requires_grad` for the method (wrapping the backbone with LoRA adapters for `lora`) and
    return AdamW parameter groups, one learning rate per group."""
    name = method_cfg.get("name")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    head = list(model.head.parameters())

    if name == "fullft":
        for p in model.parameters():
            p.requires_grad_(True)
        backbone = [p for p in model.backbone.parameters()]
        return _decay_split(head, _lr(method_cfg, "lr_head", base_lr), weight_decay, "head") + _decay_split(
            backbone, _lr(method_cfg, "lr_backbone", base_lr), weight_decay, "backbone"
        )

    if name == "lora":
        config = LoraConfig(
            r=int(method_cfg.get("r", 8)),
            lora_alpha=float(method_cfg.get("alpha", 16)),
            lora_dropout=float(method_cfg.get("dropout", 0.0)),
            target_modules=lora_target_modules(model.backbone, lora_targets(method_cfg)),
            bias="none",
        )
        with warnings.catch_warnings():
            # peft calls a transformers API that transformers 5 deprecates; nothing for our users to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model.backbone = get_peft_model(model.backbone, config)  # freezes every base weight

    for p in model.backbone.parameters():
        p.requires_grad_(False)
    norms_bias = _norms_bias_params(model.backbone, method_cfg.get("train_norms_bias", "none"))
    for p in head + norms_bias:
        p.requires_grad_(True)
    groups = _decay_split(head, _lr(method_cfg, "lr_head", base_lr), weight_decay, "head")
    if name == "lora":
        adapters = [p for n, p in model.backbone.named_parameters() if "lora_" in n]
        for p in adapters:
            p.requires_grad_(True)
        groups += _decay_split(adapters, _lr(method_cfg, "lr_lora", base_lr), weight_decay, "lora")
    if norms_bias:
        groups += _decay_split(norms_bias, _lr(method_cfg, "lr_norms_bias", base_lr), weight_decay, "norms_bias")
    return groups


def merge_lora(model: PCamClassifier) -> PCamClassifier:
    """Fold LoRA adapters into the base weights (in place); a no-op for other methods."""
    if isinstance(model.backbone, PeftModel):
        model.backbone = model.backbone.merge_and_unload()
    return model


def plain_state_dict(model: PCamClassifier) -> dict[str, torch.Tensor]:
    """State dict of the plain classifier (adapters merged), loadable without peft."""
    if not isinstance(model.backbone, PeftModel):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return merge_lora(copy.deepcopy(model)).state_dict()
