"""A user's own patches for `pcamx.predict`: image files and folders of them, PCam-layout `*_x.h5` files and
`.npy` uint8 NHWC arrays, served as uint8 batches (as PCamSplit serves its splits).

Files are only decoded here (PIL, in a few threads: decoding releases the GIL); resizing to the model's
resolution and everything else happens batched on the device, as in training. A batch holds images of one
size: a change of size closes the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pcamx.data.layout import X_KEY
from pcamx.runtime.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ARRAY_SUFFIXES = (".h5", ".hdf5", ".npy")
# Rows read from an h5 / npy source at a time: bounded memory for files of any length.
ARRAY_SLAB = 1024


class InputError(UserError, ValueError):
    """An input cannot be read as RGB patches; the message names the file and what to do."""


@dataclass(frozen=True)
class Source:
    """One input file: `count` patches (1 for an image), addressed by index within the file."""

    path: Path
    kind: str  # "image" | "h5" | "npy"
    count: int


@dataclass
class Skipped:
    """Inputs left out with --skip-bad: each file and why."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path | str, reason: str) -> None:
        self.items.append((str(path), reason))


def _supported() -> str:
    return ", ".join(IMAGE_SUFFIXES + ARRAY_SUFFIXES) + " or a folder of images"


def _array_source(path: Path) -> Source:
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"{path} could not be read as a .npy array ({err})") from None
        _check_array(path, array.shape, array.dtype, "the array")
        return Source(path, "npy", int(array.shape[0]))
    try:
        with h5py.File(path, "r") as f:
            if X_KEY not in f:
                raise InputError(f"{path} has no dataset {X_KEY!r}; a PCam-layout image file (*_x.h5) holds its "
                                 f"patches in '{X_KEY}' as (N, 96, 96, 3) uint8")
            ds = f[X_KEY]
            _check_array(path, ds.shape, ds.dtype, f"dataset '{X_KEY}'")
            return Source(path, "h5", int(ds.shape[0]))
    except OSError as err:
        raise InputError(f"{path} could not be read as HDF5 ({err})") from None


def _check_array(path: Path, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise InputError(f"{path}: {what} has shape {tuple(shape)} and dtype {dtype}; pcamx reads RGB patches as "
                         "(N, H, W, 3) uint8 (NHWC)")
    if shape[0] == 0:
        raise InputError(f"{path}: {what} holds no patches")


def discover(inputs: Iterable[str | Path], skipped: Skipped | None = None) -> list[Source]:
    """The sources named by `inputs` (files and folders, folders searched recursively for images, in sorted
    order). A path that is missing or of an unsupported kind is an InputError, or skipped and listed when
    `skipped` is given."""
    sources: list[Source] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        try:
            if path.is_dir():
                images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                if not images:
                    raise InputError(f"{path} is a folder without images ({', '.join(IMAGE_SUFFIXES)}, searched "
                                     "recursively)")
                sources += [Source(p, "image", 1) for p in images]
            elif not path.is_file():
                raise InputError(f"{path} does not exist")
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                sources.append(Source(path, "image", 1))
            elif path.suffix.lower() in ARRAY_SUFFIXES:
                sources.append(_array_source(path))
            else:
                raise InputError(f"{path}: unsupported input {path.suffix or '(no suffix)'}; give {_supported()}")
        except InputError as err:
            if skipped is None:
                raise
            skipped.add(path, str(err))
    if not sources:
        raise InputError(f"no patches to predict: the inputs hold none ({_supported()})")
    return sources


def check_rgb(img: Image.Image, path: Path) -> None:
    """InputError unless `img` is 8-bit RGB (what PCam patches are and every pcamx model was trained on)."""
    if img.mode != "RGB":
        bands = len(img.getbands())
        raise InputError(f"{path} is a {img.mode} image ({bands} channel{'s' if bands != 1 else ''}); pcamx "
                         "models take RGB patches: convert it to RGB first (e.g. PIL's .convert('RGB')), "
                         "or pass --skip-bad to leave it out")


def read_image(path: Path) -> np.ndarray:
    """An RGB image file as uint8 (H, W, 3); InputError when it cannot be decoded or is not RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            check_rgb(img, path)
            return np.asarray(img)  # mode RGB: uint8
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{path} could not be read as an image ({type(err).__name__}: {err}); pass --skip-bad to "
                         "leave it out") from None


def _array_rows(source: Source) -> Iterator[tuple[int, np.ndarray]]:
    """(first index, uint8 rows) slabs of an h5 / npy source."""
    with contextlib.ExitStack() as stack:
        if source.kind == "npy":
            data = np.load(source.path, mmap_mode="r", allow_pickle=False)
        else:
            data = stack.enter_context(h5py.File(source.path, "r"))[X_KEY]
        for start in range(0, source.count, ARRAY_SLAB):
            try:
                rows = np.ascontiguousarray(data[start:start + ARRAY_SLAB])
            except OSError as err:
                raise InputError(f"{source.path}: rows {start}.. could not be read ({err}); the file is "
                                 "damaged") from None
            yield start, rows


@dataclass
class Batch:
    """uint8 NHWC patches of one size and, for each, its source path and index there."""

    images: torch.Tensor
    sources: list[str]
    indices: list[int]


def batches(sources: list[Source], batch_size: int, skipped: Skipped | None = None,
            workers: int = 4) -> Iterator[Batch]:
    """Batches of at most `batch_size` patches in input order. An unreadable image is an InputError, or is
    left out and listed in `skipped`."""
    images: list[np.ndarray] = []
    names: list[str] = []
    indices: list[int] = []

    def flush() -> Iterator[Batch]:
        if images:
            yield Batch(torch.from_numpy(np.stack(images)), list(names), list(indices))
            images.clear(), names.clear(), indices.clear()

    def add(image: np.ndarray, name: str, index: int) -> Iterator[Batch]:
        if images and (image.shape != images[0].shape or len(images) == batch_size):
            yield from flush()
        images.append(image)
        names.append(name)
        indices.append(index)

    def decoded(path: Path) -> np.ndarray | InputError:
        try:
            return read_image(path)
        except InputError as err:
            return err

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for group in _runs(sources):
            if group[0].kind != "image":
                (source,) = group
                for start, rows in _array_rows(source):
                    for i, row in enumerate(rows):
                        yield from add(row, str(source.path), start + i)
                continue
            # Decoding runs ahead in the pool, in chunks, so memory stays bounded for any folder.
            for chunk in range(0, len(group), 4 * batch_size):
                part = group[chunk:chunk + 4 * batch_size]
                for source, image in zip(part, pool.map(decoded, [s.path for s in part]), strict=True):
                    if isinstance(image, InputError):
                        if skipped is None:
                            raise image
                        skipped.add(source.path, str(image))
                        continue
                    yield from add(image, str(source.path), 0)
    yield from flush()


def _runs(sources: list[Source]) -> Iterator[list[Source]]:
    """Consecutive image sources grouped (decoded together); every array source on its own."""
    run: list[Source] = []
    for source in sources:
        if source.kind == "image":
            run.append(source)
            continue
        if run:
            yield run
            run = []
        yield [source]
    if run:
        yield run
