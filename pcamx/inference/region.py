"""A large RGB image (a region of a slide) cut into overlapping tiles for `pcamx.predict --region`
(the heatmap of their probabilities: pcamx.report.heatmap).

The image is decoded once (3 bytes per pixel); tiles are views into it, copied a batch at a time, so memory
beyond the image itself is one batch whatever the image's size. Tile (r, c) covers rows r·stride ..
r·stride + tile and columns c·stride .. c·stride + tile; a margin narrower than a tile at the right and
bottom edges is not covered.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pcamx.inference.inputs import Batch, InputError, check_rgb

REGION_SUFFIXES = (".png", ".tif", ".tiff")
REGION_STRIP = 256  # rows copied out of the decoded image at a time


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile: int
    stride: int

    def __post_init__(self) -> None:
        if self.tile < 1 or self.stride < 1:
            raise InputError(f"--tile and --stride must be positive, got {self.tile} and {self.stride}")
        if self.tile > min(self.height, self.width):
            raise InputError(f"a {self.tile} px tile does not fit in a {self.width}×{self.height} image; use a "
                             "smaller --tile")

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of tiles."""
        return (self.height - self.tile) // self.stride + 1, (self.width - self.tile) // self.stride + 1

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def cell_extent(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) in image pixels of the heatmap: cell (r, c) is the stride × stride square
        centred on tile (r, c)'s centre, so cells tile the covered area without overlap even when tiles do."""
        rows, cols = self.shape
        half = (self.tile - self.stride) / 2
        return half, half + cols * self.stride, half + rows * self.stride, half

    def origin(self, index: int) -> tuple[int, int]:
        """(y, x) of tile `index`'s top-left pixel; tiles are numbered row by row."""
        row, col = divmod(index, self.shape[1])
        return row * self.stride, col * self.stride


def read_region(path: str | Path) -> np.ndarray:
    """A region image as uint8 (H, W, 3); PNG or TIFF, any size (PIL's decompression-bomb guard is lifted:
    the file is the user's own)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"region image {path} does not exist")
    if path.suffix.lower() not in REGION_SUFFIXES:
        raise InputError(f"region image {path}: give a {' or '.join(REGION_SUFFIXES)} file")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as img:
            check_rgb(img, path)
            img.load()
            # Copied out in strips: np.asarray(img) would hold a second full-size copy (PIL's bytes) at once.
            out = np.empty((img.height, img.width, 3), dtype=np.uint8)
            for top in range(0, img.height, REGION_STRIP):
                bottom = min(top + REGION_STRIP, img.height)
                out[top:bottom] = np.asarray(img.crop((0, top, img.width, bottom)))
            return out
    except (OSError, SyntaxError) as err:
        raise InputError(f"region image {path} could not be read ({type(err).__name__}: {err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def tile_batches(image: np.ndarray, grid: TileGrid, batch_size: int, name: str) -> Iterator[Batch]:
    """The tiles of `image`, `batch_size` at a time, row by row."""
    windows = np.lib.stride_tricks.sliding_window_view(image, (grid.tile, grid.tile), axis=(0, 1))
    windows = windows[:: grid.stride, :: grid.stride]  # (rows, cols, 3, tile, tile): views, no copy
    cols = grid.shape[1]
    for start in range(0, len(grid), batch_size):
        idx = np.arange(start, min(start + batch_size, len(grid)))
        r, c = np.divmod(idx, cols)
        tiles = np.ascontiguousarray(windows[r, c].transpose(0, 2, 3, 1))  # → NHWC
        yield Batch(torch.from_numpy(tiles), [name] * len(idx), idx.tolist())
