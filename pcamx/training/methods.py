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


def _or(value: float | None, default: float) -> float:
    return float(default if value is None else value)


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
    targets = method_cfg["targets"]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    if method_cfg["include_mlp"]:
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


def _decay_split(params: list[nn.Parameter], lr: float, weight_decay: float, label: str,
                 decay_all_params: bool) -> list[dict]:
    """AdamW groups for one set of parameters. By default (standard ViT practice) norms, biases, tokens
    and LayerScale (1-D or token-shaped tensors) get no weight decay; `decay_all_params` decays every
    parameter of the set, as the reference protocol does."""
    if decay_all_params or not weight_decay:
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": label}] if params else []
    decay = [p for p in params if p.ndim >= 2 and not (p.ndim == 3 and p.shape[0] == 1)]  # (1, n, D): tokens
    ids = {id(p) for p in decay}
    no_decay = [p for p in params if id(p) not in ids]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": label})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{label}_no_decay"})
    return groups


def init_lora_a(backbone: nn.Module, std: float) -> None:
    """LoRA A ~ N(0, std²) (B stays zero, so the adapted model starts equal to the base model); peft's
    default is Kaiming-uniform A. Draws from torch's global RNG, which the run seeded."""
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_A" in name:
                p.normal_(0.0, std)


def apply_method(
    model: PCamClassifier, method_cfg: Mapping[str, Any], base_lr: float, weight_decay: float,
    decay_all_params: bool = False,
) -> list[dict]:
    """Set `requires_grad` for the method (wrapping the backbone with LoRA adapters for `lora`) and
    return AdamW parameter groups, one learning rate and weight decay per group.

    Group learning rates are `method.lr_<group>` and weight decays `method.wd_<group>` (null: `base_lr` /
    `weight_decay`), for the groups head, backbone (fullft), lora and norms_bias."""
    name = method_cfg["name"]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    head = list(model.head.parameters())

    def groups_for(params: list[nn.Parameter], group: str) -> list[dict]:
        return _decay_split(params, _or(method_cfg[f"lr_{group}"], base_lr),
                            _or(method_cfg[f"wd_{group}"], weight_decay), group, decay_all_params)

    if name == "fullft":
        for p in model.parameters():
            p.requires_grad_(True)
        return groups_for(head, "head") + groups_for(list(model.backbone.parameters()), "backbone")

    if name == "lora":
        config = LoraConfig(
            r=int(method_cfg["r"]),
            lora_alpha=float(method_cfg["alpha"]),
            lora_dropout=float(method_cfg["dropout"]),
            target_modules=lora_target_modules(model.backbone, lora_targets(method_cfg)),
            bias="none",
        )
        with warnings.catch_warnings():
            # peft calls a transformers API that transformers 5 deprecates; nothing for our users to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model.backbone = get_peft_model(model.backbone, config)  # freezes every base weight
        if method_cfg["lora_a_std"] is not None:
            init_lora_a(model.backbone, float(method_cfg["lora_a_std"]))

    for p in model.backbone.parameters():
        p.requires_grad_(False)
    norms_bias = _norms_bias_params(model.backbone, method_cfg["train_norms_bias"])
    for p in head + norms_bias:
        p.requires_grad_(True)
    groups = groups_for(head, "head")
    if name == "lora":
        adapters = [p for n, p in model.backbone.named_parameters() if "lora_" in n]
        for p in adapters:
            p.requires_grad_(True)
        groups += groups_for(adapters, "lora")
    if norms_bias:
        groups += groups_for(norms_bias, "norms_bias")
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
