"""The official PatchCamelyon file layout (Zenodo record 2546921)."""

from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "valid", "test")
IMAGE_SHAPE: tuple[int, int, int] = (96, 96, 3)
LABEL_SHAPE: tuple[int, int, int] = (1, 1, 1)
# Both datasets are named this way inside the official files.
X_KEY = "x"
Y_KEY = "y"
# Per-patch metadata that comes with the HDF5 files in the same record; `wsi` names the patch's slide.
META_KIND = "meta"
META_COLUMNS: tuple[str, ...] = ("coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi")
SLIDE_COLUMN = "wsi"


def file_name(split: str, kind: str) -> str:
    """`camelyonpatch_level_2_split_{split}_{kind}.h5`, kind in {"x", "y"}."""
    if split not in SPLITS:
        raise ValueError(f"unknown PCam split {split!r}; expected one of {SPLITS}")
    if kind not in (X_KEY, Y_KEY):
        raise ValueError(f"unknown PCam file kind {kind!r}; expected 'x' or 'y'")
    return f"camelyonpatch_level_2_split_{split}_{kind}.h5"


def meta_file_name(split: str) -> str:
    """`camelyonpatch_level_2_split_{split}_meta.csv`: one row per patch, in the HDF5 files' order."""
    if split not in SPLITS:
        raise ValueError(f"unknown PCam split {split!r}; expected one of {SPLITS}")
    return f"camelyonpatch_level_2_split_{split}_{META_KIND}.csv"


def split_file_names(split: str) -> list[str]:
    """The three files of a split: images, labels, metadata."""
    return [file_name(split, X_KEY), file_name(split, Y_KEY), meta_file_name(split)]


def all_file_names() -> list[str]:
    return [name for split in SPLITS for name in split_file_names(split)]
