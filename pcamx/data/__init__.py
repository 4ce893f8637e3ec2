"""PCam data: the official HDF5 layout, loaders, download, synthetic stand-in and device transforms.

`load_data(cfg.data)` gives a run its three splits. `DATASETS` is what `data.name` may be: each entry makes
sure the data is under `data.root` before it is read (the synthetic stand-in is generated on first use).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcamx.data.pcam import PCamSplit
from pcamx.data.synthetic import ensure_synthetic, is_synthetic


@dataclass
class Data:
    train: PCamSplit
    valid: PCamSplit
    test: PCamSplit
    source: str  # "pcam" or "synthetic": written into every output


def _synthetic(root: Path, dcfg: Mapping[str, Any]) -> None:
    ensure_synthetic(root, {"train": dcfg["n_train"], "valid": dcfg["n_valid"], "test": dcfg["n_test"]},
                     seed=dcfg["seed"])


DATASETS: dict[str, Callable[[Path, Mapping[str, Any]], None]] = {
    "pcam": lambda root, dcfg: None,  # the official files (python -m pcamx.data.download); read as they are
    "synthetic": _synthetic,
}


def load_data(dcfg: Mapping[str, Any]) -> Data:
    root = Path(dcfg["root"]).expanduser()
    DATASETS[dcfg["name"]](root, dcfg)
    limits = {"train": dcfg["limit_train"], "valid": dcfg["limit_val"], "test": dcfg["limit_test"]}
    # The marker file, not the config, decides: generated data is never reported as PCam.
    source = "synthetic" if is_synthetic(root) else "pcam"
    # Streaming reads valid and test through once up front: a damaged file fails now, not after training.
    splits = {name: PCamSplit.load(root, name, limit=limits[name], in_memory=dcfg["in_memory"], verify=name != "train")
              for name in ("train", "valid", "test")}
    return Data(**splits, source=source)
