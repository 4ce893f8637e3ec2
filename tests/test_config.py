"""Every config group option composes; bad options fail with Hydra's or our own clear errors."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from conftest import CONF, compose_config
from pcamx.hardware import resolve_device

GROUPS = ["data", "model", "method", "hardware", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group: str, option: str) -> None:
    cfg = compose_config(f"{group}={option}")
    if group in ("data", "model", "method"):
        assert cfg[group].name == option
    assert cfg.train.select_metric == "auroc"


def test_defaults_match_the_documented_ones() -> None:
    cfg = compose_config()
    assert (cfg.data.name, cfg.model.name, cfg.method.name, cfg.hardware.device) == (
        "pcam", "dinov3_vits16", "head_only", "auto")
    assert cfg.model.name_or_path == "facebook/dinov3-vits16-pretrain-lvd1689m"
    assert cfg.data.root == "data/pcam" and cfg.data.resolution == 224
    t = cfg.train
    assert (t.epochs, cfg.data.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.grad_clip) == (
        10, 128, 1e-3, 1e-4, 200, 1.0)
    assert (t.label_smoothing, cfg.seed, t.select_metric) == (0.0, 1337, "auroc")
    lora = compose_config("method=lora").method
    assert (lora.r, lora.alpha, list(lora.targets)) == (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"])


def test_demo_preset_uses_synthetic_data_and_the_tiny_model() -> None:
    cfg = compose_config("experiment=demo")
    assert (cfg.data.name, cfg.model.name, cfg.model.name_or_path) == ("synthetic", "dinov3_tiny", None)
    assert "synthetic" in cfg.data.root


def test_unknown_group_option_is_hydras_error() -> None:
    with pytest.raises(ConfigCompositionException, match="method"):
        compose_config("method=adapterfusion")


def test_unknown_key_is_hydras_error() -> None:
    with pytest.raises((ConfigCompositionException, ConfigAttributeError, ConfigKeyError)):
        compose_config("train.epochz=3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_so() -> None:
    with pytest.raises(RuntimeError, match="hardware=cuda but no CUDA device"):
        resolve_device(compose_config("hardware=cuda").hardware.device)


def test_unknown_device_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="auto"):
        resolve_device("tpu")
