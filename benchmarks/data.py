"""The benchmark's data: synthetic files in the official PCam layout, made once per run.

* `root`: train/valid/test from `write_synthetic` (the sections read train and test);
* `load_root`: one large split (32,768 patches by default, like PCam's valid and test) for the
  `data.in_memory=true` load figure. Generating 32,768 fresh patches at once needs ~28 GB of RAM
  (the generator works on whole float tensors), so this split is the generated training patches under
  the 8 dihedral transforms: distinct images with the generator's statistics and compression ratio,
  written with the same gzip-chunked storage as the official files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pcamx.data.layout import IMAGE_SHAPE, LABEL_SHAPE, X_KEY, Y_KEY
from pcamx.data.pcam import PCamSplit, split_paths
from pcamx.data.synthetic import write_synthetic
from pcamx.data.transforms import NUM_DIHEDRAL, dihedral

LOAD_SPLIT = "valid"
CHUNK_ROWS = 64  # as pcamx.data.synthetic writes (and the official files store) them


@dataclass
class BenchData:
    root: Path
    load_root: Path
    sizes: dict[str, int]
    load_size: int
    generate_s: float
    load_generate_s: float

    def describe(self) -> dict:
        return {
            "kind": "synthetic (pcamx.data.synthetic), official PCam layout: gzip-chunked HDF5, 64 rows/chunk",
            "sizes": self.sizes,
            "load_split_images": self.load_size,
            "generate_s": round(self.generate_s, 2),
            "load_split_generate_s": round(self.load_generate_s, 2),
        }


def write_dihedral_split(root: Path, base: torch.Tensor, labels: torch.Tensor, n: int, split: str = LOAD_SPLIT) -> None:
    """`n` patches: the uint8 NHWC `base` patches under D4 element 0, then 1, ... (cycling past 8)."""
    root.mkdir(parents=True, exist_ok=True)
    x_path, y_path = split_paths(root, split)
    with h5py.File(x_path, "w") as fx, h5py.File(y_path, "w") as fy:
        chunks = min(n, CHUNK_ROWS)
        x_ds = fx.create_dataset(X_KEY, (n, *IMAGE_SHAPE), np.uint8, chunks=(chunks, *IMAGE_SHAPE),
                                 compression="gzip", compression_opts=1)
        y_ds = fy.create_dataset(Y_KEY, (n, *LABEL_SHAPE), np.uint8, chunks=(chunks, *LABEL_SHAPE),
                                 compression="gzip", compression_opts=1)
        nchw = base.permute(0, 3, 1, 2)
        start, k = 0, 0
        while start < n:
            take = min(len(base), n - start)
            view = dihedral(nchw[:take], k % NUM_DIHEDRAL).permute(0, 2, 3, 1).contiguous()
            x_ds[start : start + take] = view.numpy()
            y_ds[start : start + take] = labels[:take].to(torch.uint8).numpy().reshape(take, *LABEL_SHAPE)
            start, k = start + take, k + 1


def prepare_data(workdir: Path, sizes: dict[str, int], load_size: int, seed: int = 0) -> BenchData:
    start = time.perf_counter()
    root = write_synthetic(workdir / "pcam", sizes, seed=seed)
    generate_s = time.perf_counter() - start

    start = time.perf_counter()
    train = PCamSplit.load(root, "train")
    write_dihedral_split(workdir / "load", train.images, train.labels, load_size)
    load_generate_s = time.perf_counter() - start
    return BenchData(root, workdir / "load", dict(sizes), load_size, generate_s, load_generate_s)
