"""A large RGB image (a region of a slide) cut into tiles for `pcamx.predict --region`.

Pillow decodes it once (about 4 bytes a pixel) and nothing else of its size is made: tiles are cut from one strip of
`tile` rows at a time. An image above `max_pixels` is refused before decoding, with the memory it would take. Tile
(r, c) covers rows r·stride .. r·stride + tile and the same columns; a margin narrower than a tile is not covered.
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
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own bomb limit (~89 Mpx), unless --max-pixels raises it
PIL_BYTES_PER_PIXEL = 4  # Pillow keeps RGB as 32-bit pixels


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


def read_region(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A region image (PNG or TIFF, RGB), decoded; InputError when it is missing, of another kind, above
    `max_pixels` (checked from its header, before decoding) or unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"region image {path} does not exist")
    if path.suffix.lower() not in REGION_SUFFIXES:
        raise InputError(f"region image {path}: give a {' or '.join(REGION_SUFFIXES)} file")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own check below, with our message
    try:
        img = Image.open(path)
        pixels = img.width * img.height
        if pixels > max_pixels:
            img.close()
            raise InputError(
                f"region image {path} is {img.width}×{img.height} = {pixels / 1e6:,.0f} Mpx, above the limit of "
                f"{max_pixels / 1e6:,.0f} Mpx; decoding it takes about {pixels * PIL_BYTES_PER_PIXEL / 1e9:.1f} GB "
                f"of memory. Pass --max-pixels {pixels} if this machine has that, or read the slide it comes from "
                "with python -m pcamx.wsi, which never holds a whole level")
        check_rgb(img, path)
        img.load()
        return img
    except (OSError, SyntaxError) as err:
        raise InputError(f"region image {path} could not be read ({type(err).__name__}: {err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def tile_batches(image: Image.Image, grid: TileGrid, batch_size: int, name: str) -> Iterator[Batch]:
    """The tiles of `image`, `batch_size` at a time, row by row; one strip of `tile` rows is copied out at a time."""
    buffer = np.empty((batch_size, grid.tile, grid.tile, 3), dtype=np.uint8)
    filled, first = 0, 0
    rows, cols = grid.shape
    for row in range(rows):
        top = row * grid.stride
        strip = np.asarray(image.crop((0, top, image.width, top + grid.tile)))  # (tile, width, 3)
        windows = np.lib.stride_tricks.sliding_window_view(strip, grid.tile, axis=1)[:, ::grid.stride][:, :cols]
        windows = windows.transpose(1, 0, 3, 2)  # (cols, tile rows, tile columns, 3): views into the strip
        col = 0
        while col < cols:
            take = min(batch_size - filled, cols - col)
            buffer[filled:filled + take] = windows[col:col + take]
            filled, col = filled + take, col + take
            if filled == batch_size:
                yield Batch(torch.from_numpy(buffer.copy()), [name] * filled, list(range(first, first + filled)))
                first, filled = first + filled, 0
    if filled:
        yield Batch(torch.from_numpy(buffer[:filled].copy()), [name] * filled, list(range(first, first + filled)))
