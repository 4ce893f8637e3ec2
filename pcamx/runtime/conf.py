"""Where conf/ lives; its defaults for code that runs without a composed config (the Python API, readers of
records that predate a key), read from the yaml so that conf/ stays the one place that gives a default; and the
ranges of numeric keys, which the typed schema declares."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

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


@dataclass(frozen=True)
class Range:
    """The values a numeric config key allows, part of the typed schema (`ranged`); None passes (an optional
    key, null in conf/). `pcamx.config.check_ranges` checks every key of a composed config against its range."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    hi_open: bool = False
    choices: tuple | None = None

    def allows(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.choices is not None:
            return value in self.choices
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def ranged(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           choices: tuple | None = None) -> Any:
    """A schema field (MISSING: conf/ gives its value) whose value must lie in the range."""
    return field(default=MISSING, metadata={"range": Range(lo, hi, lo_open, hi_open, choices)})
