"""Each method trains exactly the parameters it claims to, and LoRA merges without changing outputs."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn

from conftest import method_config, tiny_model
from pcamx.training.methods import apply_method, merge_lora, plain_state_dict


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def grouped(groups: list[dict]) -> set[int]:
    return {id(p) for g in groups for p in g["params"]}


def test_head_only_trains_only_the_head() -> None:
    model = tiny_model()
    groups = apply_method(model, method_config("head_only", train_norms_bias="none"), 1e-3, 1e-4)
    assert trainable(model) == {"head.weight", "head.bias"}
    assert grouped(groups) == {id(p) for p in model.head.parameters()}


@pytest.mark.parametrize("which", ["norms", "bias", "both"])
def test_head_only_with_norms_and_biases(which: str) -> None:
    model = tiny_model()
    groups = apply_method(model, method_config("head_only", train_norms_bias=which, lr_norms_bias=5e-5), 1e-3, 0)
    names = trainable(model) - {"head.weight", "head.bias"}
    norm_names = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    is_norm = {n for n in names if n.rsplit(".", 1)[0] in norm_names}
    assert names, "something besides the head must train"
    if which == "norms":
        assert names == is_norm
    if which == "bias":
        assert not is_norm and all(n.endswith(".bias") for n in names)
    if which == "both":
        assert is_norm and names - is_norm and all(n.endswith(".bias") for n in names - is_norm)
    assert not any(n.endswith(("q_proj.weight", "up_proj.weight", "patch_embeddings.weight")) for n in names)
    assert {g["lr"] for g in groups if g["name"].startswith("norms_bias")} == {5e-5}


def test_lora_trains_only_adapters_and_head() -> None:
    model = tiny_model()
    groups = apply_method(model, method_config("lora", r=4, alpha=8, lr_lora=2e-4, lr_head=1e-3), 5e-4, 0.0)
    assert isinstance(model.backbone, PeftModel)
    names = trainable(model)
    assert {"head.weight", "head.bias"} <= names
    adapters = names - {"head.weight", "head.bias"}
    assert adapters and all("lora_A" in n or "lora_B" in n for n in adapters)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {g["lr"] for g in groups if g["name"].startswith("lora")} == {2e-4}


def test_lora_include_mlp_and_norms_bias() -> None:
    model = tiny_model()
    apply_method(model, method_config("lora", include_mlp=True, train_norms_bias="norms"), 1e-3, 0.0)
    names = trainable(model)
    assert any(".up_proj.lora_A" in n for n in names) and any(".down_proj.lora_B" in n for n in names)
    assert any(n.endswith("norm1.weight") for n in names)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in names)


def test_lora_merge_leaves_outputs_unchanged() -> None:
    model = tiny_model()
    apply_method(model, method_config("lora", r=4, alpha=8, include_mlp=True), 1e-3, 0.0)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters do something
            nn.init.normal_(p, std=0.05)
    model.eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.inference_mode():
        before = model(x)
        plain = tiny_model(1)
        plain.load_state_dict(plain_state_dict(model))  # the checkpoint format: no peft needed to load
        from_ckpt = plain(x)
        merged = merge_lora(model)(x)
    assert not isinstance(model.backbone, PeftModel)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_ckpt, before, atol=1e-5, rtol=0)
    assert not torch.allclose(before, tiny_model(1)(x), atol=1e-3)  # adapters mattered


def test_fullft_trains_everything_with_two_learning_rates() -> None:
    model = tiny_model()
    groups = apply_method(model, method_config("fullft", lr_head=1e-3, lr_backbone=1e-5), 5e-4, 0.05)
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    assert {g["lr"] for g in groups} == {1e-3, 1e-5}
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.head.weight) in decayed and id(model.head.bias) not in decayed
    tokens = model.backbone.embeddings
    assert not {id(tokens.cls_token), id(tokens.register_tokens), id(tokens.mask_token)} & decayed
    assert id(tokens.patch_embeddings.weight) in decayed


def test_unset_learning_rates_fall_back_to_train_lr() -> None:
    groups = apply_method(tiny_model(), method_config("lora", lr_head=None, lr_lora=None), 7e-4, 0.0)
    assert {g["lr"] for g in groups} == {7e-4}


def test_unknown_method_and_norms_bias_choice_are_rejected() -> None:
    with pytest.raises(ValueError, match="head_only"):
        apply_method(tiny_model(), method_config("lora", name="prompt_tuning"), 1e-3, 0.0)
    with pytest.raises(ValueError, match="none"):
        apply_method(tiny_model(), method_config("head_only", train_norms_bias="all"), 1e-3, 0.0)


def test_default_decay_skips_1d_and_token_tensors_and_decay_all_params_decays_everything() -> None:
    model = tiny_model()
    default = {id(p): g["weight_decay"] for g in apply_method(model, method_config("fullft"), 1e-3, 0.05)
               for p in g["params"]}
    named = dict(model.named_parameters())
    # By name, not by shape: only the linear and patch-embedding weights decay by default.
    skipped = ("_token", "_tokens", ".bias", "norm1.weight", "norm2.weight", "backbone.norm.weight", "lambda1")
    decayed = {n for n in named if not any(n.endswith(s) for s in skipped)}
    assert decayed == {n for n in named if n.endswith(("_proj.weight", "patch_embeddings.weight", "head.weight"))}
    for name, p in named.items():
        assert default[id(p)] == (0.05 if name in decayed else 0.0), name
    groups = apply_method(tiny_model(), method_config("fullft"), 1e-3, 0.05, True)
    everything = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert set(everything.values()) == {0.05} and len(everything) == len(named)


def test_per_group_weight_decay_overrides_train_weight_decay() -> None:
    model = tiny_model()
    cfg = method_config("lora", wd_lora=0.0, wd_norms_bias=0.3, wd_head=None, train_norms_bias="both")
    groups = apply_method(model, cfg, 1e-3, 0.01, decay_all_params=True)
    by_name = {g["name"]: g["weight_decay"] for g in groups}
    assert by_name == {"head": 0.01, "lora": 0.0, "norms_bias": 0.3}


def test_lora_a_std_draws_a_from_a_normal_and_leaves_b_zero() -> None:
    model = tiny_model()
    apply_method(model, method_config("lora", r=8, alpha=16, include_mlp=True, lora_a_std=0.02), 1e-3, 0.0)
    named = dict(model.backbone.named_parameters())
    a = torch.cat([p.flatten() for n, p in named.items() if "lora_A" in n])
    assert a.std().item() == pytest.approx(0.02, rel=0.05) and abs(a.mean().item()) < 1e-3
    assert all(not p.any() for n, p in named.items() if "lora_B" in n)
    # peft's default (Kaiming-uniform) is bounded by 1/sqrt(fan_in), far wider than 0.02 for fan_in 32.
    default = tiny_model()
    apply_method(default, method_config("lora", r=8, alpha=16), 1e-3, 0.0)
    a_default = torch.cat([p.flatten() for n, p in default.backbone.named_parameters() if "lora_A" in n])
    assert a_default.std().item() > 0.05


def test_lora_output_is_base_plus_alpha_over_r_times_b_of_a() -> None:
    # alpha 12 with r 4: scaling 3, which peft's default (alpha 8 → 2) would not give.
    model = tiny_model()
    apply_method(model, method_config("lora", r=4, alpha=12, dropout=0.0), 1e-3, 0.0)
    layer = model.backbone.base_model.model.model.layer[0].attention.q_proj
    torch.manual_seed(3)
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_(0, 0.3)
        layer.lora_B["default"].weight.normal_(0, 0.3)
    model.eval()
    x = torch.randn(5, 32)
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    by_hand = x @ base.weight.T + base.bias + (12 / 4) * (x @ a.T) @ b.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand, atol=1e-5, rtol=0)
