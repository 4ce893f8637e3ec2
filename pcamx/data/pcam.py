"""PCam splits from the official HDF5 files, as uint8 tensors that stay uint8 until they reach the device.

Two modes share one batch interface:
* in memory (default): a split is read once with contiguous `read_direct` slabs into a preallocated
  uint8 array (the official files are gzip-chunked; per-sample reads decompress a chunk per image);
* streaming (`data.in_memory=false`): shuffled contiguous slabs are read on demand, for machines
  without ~8 GB to spare for the training split.
"""

from __future__ import annotations

import contextlib
import csv
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch

from pcamx.data.layout import IMAGE_SHAPE, LABEL_SHAPE, SLIDE_COLUMN, X_KEY, Y_KEY, file_name, meta_file_name
from pcamx.data.synthetic import is_synthetic
from pcamx.runtime.errors import UserError

DOWNLOAD_HINT = "python -m pcamx.data.download --root {root}"
# Rows per contiguous read: large enough to amortize chunk decompression, small enough to bound RAM.
SLAB_ROWS = 4096


class PCamDataError(UserError, RuntimeError):
    """A PCam file is missing, damaged or does not have the official layout."""


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """HDF5 read errors ("filter returned failure", a truncated file) with the file's name and the way out."""
    try:
        yield
    except OSError as err:
        fix = ("delete the directory and the run generates it again" if is_synthetic(path.parent) else
               f"check it with `python -m pcamx.data.download --root {path.parent} --verify`, delete it and "
               "download it again")
        raise PCamDataError(f"{path} could not be read ({err}): the file is damaged; {fix}") from err


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    root = Path(root)
    return root / file_name(split, X_KEY), root / file_name(split, Y_KEY)


def _check_dataset(path: Path, ds: h5py.Dataset, tail: tuple[int, ...], what: str) -> None:
    if ds.dtype != np.uint8 or ds.ndim != 1 + len(tail) or tuple(ds.shape[1:]) != tail:
        raise PCamDataError(
            f"{path}: dataset '{ds.name.lstrip('/')}' has shape {ds.shape} and dtype {ds.dtype}; the official "
            f"PCam layout is (N, {', '.join(map(str, tail))}) uint8 ({what})."
        )


def _open(path: Path, key: str, root: Path) -> h5py.File:
    if not path.is_file():
        raise PCamDataError(
            f"missing PCam file {path}. Fetch the official files with:\n  "
            + DOWNLOAD_HINT.format(root=root)
            + "\nor run on generated stand-in data with data=synthetic."
        )
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PCamDataError(f"{path} is not a readable HDF5 file ({err}); delete it and download again.") from err
    if key not in f:
        found = list(f.keys())
        f.close()
        raise PCamDataError(f"{path} has no dataset '{key}' (found {found}); the official layout has '{key}'.")
    return f


@dataclass
class SplitFiles:
    """Validated handles of one split's x/y files; `n` rows are used (after `limit`)."""

    x_path: Path
    y_path: Path
    n: int
    split: str

    @classmethod
    def open(cls, root: str | Path, split: str, limit: int = 0) -> SplitFiles:
        root = Path(root)
        x_path, y_path = split_paths(root, split)
        with _open(x_path, X_KEY, root) as fx, _open(y_path, Y_KEY, root) as fy:
            _check_dataset(x_path, fx[X_KEY], IMAGE_SHAPE, "96x96 RGB patches")
            _check_dataset(y_path, fy[Y_KEY], LABEL_SHAPE, "one 0/1 label per patch")
            n_x, n_y = fx[X_KEY].shape[0], fy[Y_KEY].shape[0]
        if n_x != n_y:
            raise PCamDataError(f"{x_path} holds {n_x} images but {y_path} holds {n_y} labels; they must agree.")
        n = n_x
        if limit and limit > n:
            warnings.warn(f"data limit {limit} exceeds the {split} split's {n} patches; using all {n}", stacklevel=2)
        elif limit:
            n = limit
        return cls(x_path, y_path, n, split)

    def read_labels(self) -> np.ndarray:
        # Read the (N,1,1,1) array at once and squeeze: NumPy 2 refuses int() on a (1,1,1) element.
        with reading(self.y_path), h5py.File(self.y_path, "r") as f:
            labels = np.empty((self.n, *LABEL_SHAPE), dtype=np.uint8)
            f[Y_KEY].read_direct(labels, np.s_[0 : self.n])
        labels = labels.reshape(self.n)
        if labels.size and labels.max() > 1:
            raise PCamDataError(f"{self.y_path}: labels must be 0 or 1, found {int(labels.max())}")
        return labels

    def read_images(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) in one contiguous read."""
        out = np.empty((stop - start, *IMAGE_SHAPE), dtype=np.uint8) if out is None else out
        with reading(self.x_path), h5py.File(self.x_path, "r") as f:
            f[X_KEY].read_direct(out, np.s_[start:stop])
        return out

    def read_slides(self) -> np.ndarray | None:
        """The slide (`wsi`) of each of the `n` patches from the split's metadata CSV; None without the file."""
        path = self.x_path.parent / meta_file_name(self.split)
        if not path.is_file():
            return None
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if SLIDE_COLUMN not in (reader.fieldnames or ()):
                    raise PCamDataError(f"{path} has no '{SLIDE_COLUMN}' column (found {reader.fieldnames}); the "
                                        "official metadata names each patch's slide there. Delete the file to "
                                        "fall back to patch resampling, or download it again.")
                slides = [row[SLIDE_COLUMN] for _, row in zip(range(self.n), reader, strict=False)]
        except (OSError, csv.Error, UnicodeDecodeError) as err:
            raise PCamDataError(f"{path} could not be read ({err}); delete it or download it again") from err
        if len(slides) < self.n:
            raise PCamDataError(f"{path} has {len(slides)} rows but {self.x_path} holds at least {self.n} patches; "
                                "they must agree row for row (delete the CSV or download it again)")
        return np.asarray(slides)

    def verify_images(self) -> None:
        """Read every image once (slab by slab, nothing kept): a damaged file fails now, not mid-run."""
        buffer = np.empty((SLAB_ROWS, *IMAGE_SHAPE), dtype=np.uint8)
        for start in range(0, self.n, SLAB_ROWS):
            stop = min(start + SLAB_ROWS, self.n)
            self.read_images(start, stop, buffer[: stop - start])


class PCamSplit:
    """One split as uint8 NHWC images and int64 labels, served in batches.

    `batches()` yields CPU tensors `(images uint8 (B,96,96,3), labels int64 (B,))`; the caller moves them
    to the device, where all float work happens.
    """

    def __init__(self, files: SplitFiles, in_memory: bool = True, verify: bool = False):
        self.files = files
        self.labels = torch.from_numpy(files.read_labels().astype(np.int64))
        self.images: torch.Tensor | None = None
        if in_memory:
            self.images = torch.from_numpy(self._read_all())
        elif verify:
            files.verify_images()

    @classmethod
    def load(cls, root: str | Path, split: str, limit: int = 0, in_memory: bool = True, verify: bool = False):
        """`verify` (streaming only; in memory every image is read anyway): read the split through once now."""
        return cls(SplitFiles.open(root, split, limit), in_memory=in_memory, verify=verify)

    def __len__(self) -> int:
        return self.files.n

    @cached_property
    def slides(self) -> np.ndarray | None:
        """Each patch's slide id (from the metadata CSV beside the HDF5 files), or None when there is none."""
        return self.files.read_slides()

    def _read_all(self) -> np.ndarray:
        n = self.files.n
        out = np.empty((n, *IMAGE_SHAPE), dtype=np.uint8)
        with reading(self.files.x_path), h5py.File(self.files.x_path, "r") as f:
            ds = f[X_KEY]
            for start in range(0, n, SLAB_ROWS):
                stop = min(start + SLAB_ROWS, n)
                ds.read_direct(out, np.s_[start:stop], np.s_[start:stop])
        return out

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.images is not None:
            yield from self._memory_batches(batch_size, shuffle, generator, drop_last)
        else:
            yield from self._stream_batches(batch_size, shuffle, generator, drop_last)

    def _memory_batches(self, batch_size, shuffle, generator, drop_last):
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size:
                return
            if order is None:
                yield self.images[start:stop], self.labels[start:stop]
            else:
                idx = order[start:stop]
                yield self.images[idx], self.labels[idx]

    def _stream_batches(self, batch_size, shuffle, generator, drop_last):
        # Shuffle the order of contiguous slabs, then rows within a slab: every read stays contiguous.
        n = len(self)
        starts = torch.arange(0, n, SLAB_ROWS)
        if shuffle:
            starts = starts[torch.randperm(len(starts), generator=generator)]
        left_x = torch.empty((0, *IMAGE_SHAPE), dtype=torch.uint8)
        left_y = torch.empty((0,), dtype=torch.int64)
        for start in starts.tolist():
            stop = min(start + SLAB_ROWS, n)
            x = torch.from_numpy(self.files.read_images(start, stop))
            y = self.labels[start:stop]
            if shuffle:
                perm = torch.randperm(stop - start, generator=generator)
                x, y = x[perm], y[perm]
            if len(left_x):
                x, y = torch.cat([left_x, x]), torch.cat([left_y, y])
            full = len(x) // batch_size * batch_size
            for s in range(0, full, batch_size):
                yield x[s : s + batch_size], y[s : s + batch_size]
            left_x, left_y = x[full:], y[full:]
        if len(left_x) and not drop_last:
            yield left_x, left_y
