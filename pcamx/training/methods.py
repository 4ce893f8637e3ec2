"""Fine-tuning methods: which parameters train, and at which learning rate and weight decay.

`METHODS` is the registry: a method is its typed config (what conf/method/<name>.yaml builds on) and a function that
sets `requires_grad` (wrapping the backbone if it must) and returns the AdamW groups, at `method.lr_<group>` /
`method.wd_<group>` (null: train.lr / train.weight_decay). A new method is one `register(Method(...))` and its yaml.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from pcamx.model import PCamClassifier
from pcamx.runtime.conf import ranged

NORMS_BIAS = ("none", "norms", "bias", "both")  # method.train_norms_bias: which backbone tensors also train
MLP_TARGETS = ("up_proj", "down_proj")  # what method.include_mlp adds to LoRA's targets


# ---------------------------------------------------------------- the typed configs (MISSING: conf/ gives them)


def _lr() -> Any:
    return ranged(0, lo_open=True)  # a group's learning rate (null: train.lr)


def _decay() -> Any:
    return ranged(0)  # a group's weight decay (null: train.weight_decay)



@dataclass
class MethodConfig:
    name: str = MISSING
    lr_head: float | None = _lr()
    wd_head: float | None = _decay()


@dataclass
class NormsBiasConfig(MethodConfig):
    lr_norms_bias: float | None = _lr()
    wd_norms_bias: float | None = _decay()
    train_norms_bias: str = MISSING  # one of NORMS_BIAS (an enum in the schema)


@dataclass
class HeadOnlyConfig(NormsBiasConfig):
    pass


@dataclass
class LoraConfig(NormsBiasConfig):
    lr_lora: float | None = _lr()
    wd_lora: float | None = _decay()
    r: int = ranged(1)
    alpha: float = ranged(0, lo_open=True)
    dropout: float = ranged(0, 1, hi_open=True)
    lora_a_std: float | None = ranged(0, lo_open=True)
    targets: list[str] = MISSING
    include_mlp: bool = MISSING


@dataclass
class FullFTConfig(MethodConfig):
    lr_backbone: float | None = _lr()
    wd_backbone: float | None = _decay()


# ---------------------------------------------------------------- parameter groups


@dataclass(frozen=True)
class Rates:
    """Turns a set of parameters into AdamW groups at the method's rates for a named group."""

    method: Mapping[str, Any]
    lr: float  # train.lr: the rate of a group whose method.lr_<group> is null
    weight_decay: float  # train.weight_decay, likewise
    decay_all_params: bool

    def __call__(self, params: list[nn.Parameter], group: str) -> list[dict]:
        """AdamW groups for `params`. Standard ViT practice: norms, biases, tokens and LayerScale (1-D or
        token-shaped tensors) get no weight decay, unless train.decay_all_params (the reference protocol)."""
        lr = float(self.lr if self.method[f"lr_{group}"] is None else self.method[f"lr_{group}"])
        wd = float(self.weight_decay if self.method[f"wd_{group}"] is None else self.method[f"wd_{group}"])
        if self.decay_all_params or not wd:
            return [{"params": params, "lr": lr, "weight_decay": wd, "name": group}] if params else []
        decay = [p for p in params if p.ndim >= 2 and not (p.ndim == 3 and p.shape[0] == 1)]  # (1, n, D): tokens
        ids = {id(p) for p in decay}
        no_decay = [p for p in params if id(p) not in ids]
        return ([{"params": decay, "lr": lr, "weight_decay": wd, "name": group}] if decay else []) + \
            ([{"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{group}_no_decay"}] if no_decay else [])


def norms_bias_params(backbone: nn.Module, which: str) -> list[nn.Parameter]:
    """The backbone's LayerNorm weights/biases (`norms`), other biases (`bias`), both or none (adapters excluded)."""
    if which not in NORMS_BIAS:
        raise ValueError(f"method.train_norms_bias must be one of {', '.join(NORMS_BIAS)}, got {which!r}")
    module_of = dict(backbone.named_modules())
    picked = []
    for name, p in backbone.named_parameters():
        if "lora_" in name:
            continue
        norm = isinstance(module_of.get(name.rsplit(".", 1)[0]), nn.LayerNorm)
        bias = name.endswith(".bias") and not norm
        if (norm and which in ("norms", "both")) or (bias and which in ("bias", "both")):
            picked.append(p)
    return picked


def _frozen_backbone(model: PCamClassifier, cfg: Mapping[str, Any], rates: Rates,
                     adapters: Sequence[nn.Parameter] = ()) -> list[dict]:
    """Freeze the backbone, then train the head, the `adapters` and the chosen norms/biases (groups in that order)."""
    model.backbone.requires_grad_(False)
    norms_bias = norms_bias_params(model.backbone, cfg["train_norms_bias"])
    for p in [*model.head.parameters(), *adapters, *norms_bias]:
        p.requires_grad_(True)
    groups = rates(list(model.head.parameters()), "head")
    return groups + (rates(list(adapters), "lora") if adapters else []) + rates(norms_bias, "norms_bias")


# ---------------------------------------------------------------- the methods


def head_only(model: PCamClassifier, cfg: Mapping[str, Any], rates: Rates) -> list[dict]:
    return _frozen_backbone(model, cfg, rates)


def lora_targets(cfg: Mapping[str, Any]) -> list[str]:
    targets = cfg["targets"]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    return targets + ([t for t in MLP_TARGETS if t not in targets] if cfg["include_mlp"] else [])


def lora_target_modules(backbone: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the nn.Linear modules to adapt: a target itself, or both halves of a target that
    truncated SVD replaced by a low-rank pair (so a compressed model can be healed with LoRA too)."""
    names = []
    for name, module in backbone.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and (parts[-1] in targets or (len(parts) > 1 and parts[-2] in targets)):
            names.append(name)
    if not names:
        raise ValueError(f"no linear layer of the backbone matches the LoRA targets {targets} (method.targets)")
    return names


def lora(model: PCamClassifier, cfg: Mapping[str, Any], rates: Rates) -> list[dict]:
    """peft adapters on the targets (B = 0, so the adapted model starts equal to the base model). A ~ N(0, std²)
    with method.lora_a_std, from torch's global RNG (seeded by the run); else peft's Kaiming-uniform A."""
    config = PeftLoraConfig(r=int(cfg["r"]), lora_alpha=float(cfg["alpha"]), lora_dropout=float(cfg["dropout"]),
                            target_modules=lora_target_modules(model.backbone, lora_targets(cfg)), bias="none")
    with warnings.catch_warnings():
        # peft calls a transformers API that transformers 5 deprecates; nothing for our users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model.backbone = get_peft_model(model.backbone, config)
    if cfg["lora_a_std"] is not None:
        with torch.no_grad():
            for name, p in model.backbone.named_parameters():
                if "lora_A" in name:
                    p.normal_(0.0, float(cfg["lora_a_std"]))
    return _frozen_backbone(model, cfg, rates, [p for n, p in model.backbone.named_parameters() if "lora_" in n])


def fullft(model: PCamClassifier, cfg: Mapping[str, Any], rates: Rates) -> list[dict]:
    model.requires_grad_(True)
    return rates(list(model.head.parameters()), "head") + rates(list(model.backbone.parameters()), "backbone")


@dataclass(frozen=True)
class Method:
    name: str
    config: type[MethodConfig]  # the schema of conf/method/<name>.yaml
    apply: Callable[[PCamClassifier, Mapping[str, Any], Rates], list[dict]]


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("head_only", HeadOnlyConfig, head_only))
register(Method("lora", LoraConfig, lora))
register(Method("fullft", FullFTConfig, fullft))


def apply_method(model: PCamClassifier, method_cfg: Mapping[str, Any], base_lr: float, weight_decay: float,
                 decay_all_params: bool = False) -> list[dict]:
    """Prepare `model` for training with the method `method_cfg` names; returns its AdamW parameter groups."""
    name = method_cfg["name"]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name].apply(model, method_cfg, Rates(method_cfg, base_lr, weight_decay, decay_all_params))


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
