"""The official PatchCamelyon file layout (Zenodo record 2546921)."""

from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "valid", "test")
IMAGE_SHAPE: tuple[int, int, int] = (96, 96, 3)
LABEL_SHAPE: tuple[int, int, int] = (1, 1, 1)
# Both datasets are named this way inside the official files.
X_KEY = "x"
Y_KEY = "y"


def file_name(split: str, kind: str) -> str:
    """`camelyonpatch_level_2_split_{split}_{kind}.h5`, kind in {"x", "y"}."""
    if split not in SPLITS:
        raise ValueError(f"unknown PCam split {split!r}; expected one of {SPLITS}")
    if kind not in (X_KEY, Y_KEY):
        raise ValueError(f"unknown PCam file kind {kind!r}; expected 'x' or 'y'")
    return f"camelyonpatch_level_2_split_{split}_{kind}.h5"


def all_file_names() -> list[str]:
    return [file_name(s, k) for s in SPLITS for k in (X_KEY, Y_KEY)]
