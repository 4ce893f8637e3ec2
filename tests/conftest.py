"""Shared fixtures: composed configs, a small synthetic PCam-layout dataset, quiet W&B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SMALL_SIZES = {"train": 512, "valid": 128, "test": 128}

os.environ.setdefault("WANDB_MODE", "disabled")


def compose_config(*overrides: str, hydra_config: bool = False) -> DictConfig:
    """The config `python run.py <overrides>` would run with."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


@pytest.fixture(scope="session")
def small_pcam(tmp_path_factory) -> Path:
    """A small synthetic dataset in the official file layout."""
    from pcamx.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("pcam") / "small", SMALL_SIZES, seed=0)


def fast_overrides(root: Path, *extra: str) -> list[str]:
    """A few steps of the tiny model on `root`: the whole pipeline in seconds."""
    return [
        "model=dinov3_tiny",
        "debug=fast",
        "data.name=pcam",
        f"data.root={root}",
        "data.resolution=32",
        "hardware=cpu",
        *extra,
    ]
