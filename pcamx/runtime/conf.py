"""Where conf/ lives, and its defaults for code that runs without a composed config (the Python API, readers of
records that predate a key): read from the yaml, so conf/ stays the one place that gives a default."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@functools.cache
def _load(group: str, option: str) -> dict[str, Any]:
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run from a pcamx checkout (the configs live in conf/)")
    node = OmegaConf.to_container(OmegaConf.load(path))
    node.pop("defaults", None)
    return node


def conf_defaults(group: str, option: str = "none") -> dict[str, Any]:
    """The keys of conf/<group>/<option>.yaml (for prune: `none`, which every prune option builds on)."""
    return copy.deepcopy(_load(group, option))
