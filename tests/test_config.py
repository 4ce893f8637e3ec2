"""Every config group option composes into a complete, typed config; typos fail at composition, naming the
allowed values."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, compose_config
from pcamx.runtime.hardware import resolve_device

GROUPS = ["data", "model", "method", "prune", "quant", "hardware", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_completely(group: str, option: str) -> None:
    cfg = compose_config(f"{group}={option}")
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
