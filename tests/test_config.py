"""Every config group option composes into a complete, typed config; typos fail at composition, naming the
allowed values."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, compose_config
from pcamx.runtime.errors import ConfigError
from pcamx.runtime.hardware import resolve_device

GROUPS = ["data", "model", "method", "prune", "quant", "hardware", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_completely(group: str, option: str) -> None:
    cfg = compose_config(f"{group}={option}")  # every bounded value in its range, too
    # Every field of the schema is set (a MISSING value raises here) and every interpolation resolves.
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group in ("data", "model", "method"):
        assert resolved[group]["name"] == option


@pytest.mark.parametrize("override,allowed", [
    ("method.train_norms_bias=bothh", "[none, norms, bias, both]"),
    ("hardware.precision=bf61", "[fp32, bf16]"),
    ("hardware.device=tpu", "[auto, cpu, cuda, mps]"),
    ("quant.mode=int4", "[none, bf16, int8]"),
    ("data.name=camelyon", "[pcam, synthetic]"),
    ("train.select_metric=aurocc", "[auroc, auprc, sens_at_95spec, ece, brier, acc, nll, sens95, val_loss]"),
    ("prune.order=[heads,mlp,sdv]", "[heads, mlp, svd, blocks]"),
    ("prune.criterion=magnitude", "[weight, activation, taylor]"),
    ("prune.scope=model", "[layer, global]"),
    ("prune.method=lottery", "[none, heads, mlp, svd, blocks, all]"),
    ("model.architecture=vitb", "[vits16, tiny]"),
    ("eval.calibrate=platt", "[none, temperature]"),
])
def test_a_typo_in_an_enum_key_fails_at_composition_with_the_allowed_values(override: str, allowed: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(override)
    assert f"expected one of {allowed}" in str(err.value.__cause__)


@pytest.mark.parametrize("override", ["train.epochz=3", "method.r=4", "data.seed=1", "model.hidden_size=8"])
def test_an_unknown_key_fails_at_composition(override: str) -> None:
    # method.r exists for lora only, data.seed for synthetic data only: not for the default options.
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{override.split('=')[0]}'"):
        compose_config(override)
    assert compose_config("method=lora", "method.r=4").method.r == 4


def test_a_value_of_the_wrong_type_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train.epochs=ten")
    assert "could not be converted to Integer" in str(err.value.__cause__)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_so() -> None:
    with pytest.raises(RuntimeError, match="hardware=cuda but no CUDA device"):
        resolve_device(compose_config("hardware=cuda").hardware.device)


def test_unknown_device_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="auto"):
        resolve_device("tpu")


@pytest.mark.parametrize("overrides,message", [
    (["train.epochs=-1"], "train.epochs=-1 is out of range: it must be >= 1"),
    (["train.epochs=0"], "train.epochs=0 is out of range: it must be >= 1"),
    (["data.batch_size=0"], "data.batch_size=0 is out of range: it must be >= 1"),
    (["method=lora", "method.r=0"], "method.r=0 is out of range: it must be >= 1"),
    (["method=lora", "method.alpha=0"], "method.alpha=0.0 is out of range: it must be > 0"),
    (["method=fullft", "method.lr_backbone=-1e-4"], "method.lr_backbone=-0.0001 is out of range: it must be > 0"),
    (["eval.tta_views=4"], "eval.tta_views=4 is out of range: it must be one of 1, 6, 8"),
    (["eval.bootstrap=-5"], "eval.bootstrap=-5 is out of range: it must be >= 0"),
    (["hardware.num_threads=0"], "hardware.num_threads=0 is out of range: it must be >= 1"),
    (["prune=all", "prune.target_ratio=1.5"], "prune.target_ratio=1.5 is out of range: it must be in (0, 1]"),
    (["train.label_smoothing=1"], "train.label_smoothing=1.0 is out of range: it must be in [0, 1)"),
    (["data=synthetic", "data.n_valid=1"], "data.n_valid=1 is out of range: it must be >= 2"),
])
def test_a_value_out_of_its_range_fails_at_composition_naming_key_and_range(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(*overrides)
    assert str(err.value) == message
