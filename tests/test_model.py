"""The real loading path (from_pretrained of a local save_pretrained dir) and its error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DINOv3ViTModel

from pcamx.evaluation.footprint import count_params as count_parameters
from pcamx.model import ModelLoadError, PCamClassifier, architecture, build_model


@pytest.fixture(scope="module")
def vits16_dir(tmp_path_factory) -> Path:
    """A random-weight model with the real ViT-S/16 architecture, saved like a hub checkpoint."""
    path = tmp_path_factory.mktemp("dinov3-vits16")
    torch.manual_seed(0)
    DINOv3ViTModel(architecture("vits16")).save_pretrained(path)
    return path


def test_local_save_pretrained_dir_loads_with_real_size(vits16_dir: Path) -> None:
    model = build_model({"name_or_path": str(vits16_dir), "architecture": "vits16", "config": {}})
    assert isinstance(model, PCamClassifier)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 12
    assert model.config.num_attention_heads == 6 and model.config.num_register_tokens == 4
    assert round(count_parameters(model) / 1e6, 2) == 21.60
    reference = DINOv3ViTModel.from_pretrained(vits16_dir)
    for (name, p), (_, q) in zip(model.backbone.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_unloadable_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        build_model({"name_or_path": str(tmp_path / "nowhere"), "architecture": "vits16", "config": {}})
    message = str(err.value)
    assert "huggingface-cli login" in message
    assert "model.name_or_path=" in message and "model=dinov3_tiny" in message


def test_offline_hub_id_gives_the_same_guidance(monkeypatch) -> None:
    import huggingface_hub.constants

    # The env var is read at import time; patch the parsed constant so no request is ever attempted.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="huggingface-cli login"):
        build_model({"name_or_path": "facebook/dinov3-vits16-pretrain-lvd1689m", "architecture": "vits16",
                     "config": {}})


def test_tiny_model_is_built_in_code_without_download() -> None:
    model = build_model({"name_or_path": None, "architecture": "tiny",
                         "config": {"hidden_size": 32, "num_attention_heads": 2}})
    assert model.config.hidden_size == 32 and model.head.in_features == 32
    assert model.backbone.config._attn_implementation == "sdpa"
