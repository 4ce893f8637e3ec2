"""Whole-slide images for `python -m pcamx.wsi`: OpenSlide (any format it reads; the openslide-bin wheel brings the
library), a level-0 tile grid at the model's magnification, tissue on a thumbnail, tiles read in threads, a
resumable store of scored tiles. A tile is round(PATCH · model_mpp / slide_mpp) level-0 px, read from the coarsest
level on which it still spans PATCH px, made a PATCH-px patch on the device; nothing holds a whole level.
"""

from __future__ import annotations

import json
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from PIL import Image, ImageFilter

from pcamx.inference.inputs import Batch, InputError
from pcamx.inference.region import TileGrid
from pcamx.runtime import disk
from pcamx.runtime.errors import OutputError

PATCH = 96  # px of a PCam patch
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi")
MASK_PX = 8  # thumbnail px along a tile's side, about: tissue fractions in steps of ~1/64
STRIP_PIXELS = 1 << 23  # px of the thumbnail's level read at a time
MEDIAN = 5  # px of the median blur on the saturation before Otsu (as CLAM does)
# Saturation (of 255) that tissue always exceeds: glass and blank scans sit near 0, H&E well above. Otsu alone would
# split a blank slide inside its noise, and a slide without glass inside its tissue.
MIN_SATURATION = 20


class SlideError(InputError):
    """A slide that cannot be scored (unreadable, no µm/px, no tissue): --skip-bad leaves it out."""


def find_slides(inputs: Iterable[str | Path]) -> list[Path]:
    """Files (any suffix: OpenSlide decides) and folders, searched recursively for SLIDE_SUFFIXES, sorted."""
    found: list[Path] = []
    for path in (Path(p).expanduser() for p in inputs):
        if path.is_dir():
            slides = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not slides:
                raise InputError(f"{path} is a folder without slides ({', '.join(SLIDE_SUFFIXES)}; searched "
                                 "recursively)")
            found += slides
        elif not path.is_file():
            raise InputError(f"slide {path} does not exist")
        else:
            found.append(path)
    return found


def open_slide(path: Path) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as err:
        raise SlideError(f"{path} could not be read by OpenSlide ({type(err).__name__}: {err}); give a slide in a "
                         "format it reads (.svs, .ndpi, .mrxs, .scn, tiled pyramidal TIFF, ...) or pass --skip-bad") \
            from None


@dataclass(frozen=True)
class Geometry:
    """A slide's tile grid (level-0 px) and how its tiles are read."""

    width: int
    height: int
    mpp: float  # level-0 µm/px
    mpp_source: str  # openslide.mpp-x | --mpp
    tile: int  # level-0 px
    stride: int
    level: int  # the pyramid level read
    downsample: float
    read: int  # px of a tile on that level

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.height, self.width, self.tile, self.stride)


def geometry(slide: openslide.OpenSlide, path: Path, model_mpp: float, mpp: float | None = None,
             stride: int | None = None) -> Geometry:
    """The grid and level for a model of `model_mpp` µm/px; `mpp` (--mpp) replaces the slide's own, without which
    it is refused."""
    source = "--mpp"
    if mpp is None:
        source = openslide.PROPERTY_NAME_MPP_X
        try:
            mpp = float(slide.properties[source])
        except (KeyError, ValueError):
            raise SlideError(f"{path} does not record its µm per pixel ({source}); pass --mpp with its level-0 "
                             "µm/px (about 0.25 for a 40× scan, 0.5 for 20×), or --skip-bad") from None
        if not 0 < mpp < 1000:
            raise SlideError(f"{path} records {mpp} µm/px, which cannot be right; pass --mpp with the real value")
    tile = max(1, round(PATCH * model_mpp / mpp))
    downsamples = slide.level_downsamples
    level = max((i for i, d in enumerate(downsamples) if round(tile / d) >= PATCH), default=0)
    width, height = slide.dimensions
    if tile > min(width, height):
        raise SlideError(f"{path} ({width}×{height} px) is smaller than one tile ({tile} px at {mpp:g} µm/px)")
    return Geometry(width, height, mpp, source, tile, stride or tile, level, float(downsamples[level]),
                    round(tile / downsamples[level]))


def rgb(region: Image.Image) -> np.ndarray:
    """OpenSlide's RGBA (not premultiplied) over white: where it has no data (transparent) is glass."""
    a = np.asarray(region)
    if a[..., 3].min() == 255:  # inside the scanned area: nothing to blend
        return a[..., :3]
    alpha = a[..., 3:].astype(np.uint16)  # c·α + 255·(255 − α) <= 255²: no overflow
    return ((a[..., :3] * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)


@dataclass
class Tissue:
    thumbnail: np.ndarray  # RGB uint8 covering the slide
    threshold: int  # saturation above which a thumbnail pixel is tissue
    fraction: np.ndarray  # tissue share of each grid tile, row by row


def find_tissue(slide: openslide.OpenSlide, geo: Geometry) -> Tissue:
    """The thumbnail (about MASK_PX px per tile side: the coarsest level fine enough, box-reduced by a whole
    factor, strip by strip), its tissue mask (Otsu on the blurred saturation) and each tile's share of it."""
    target = geo.tile / MASK_PX
    level = max((i for i, d in enumerate(slide.level_downsamples) if d <= target), default=0)
    ds = slide.level_downsamples[level]
    f = max(1, round(target / ds))
    full_w, full_h = slide.level_dimensions[level]
    wl, hl = full_w // f * f, full_h // f * f  # whole f × f blocks (a sliver at the edges is left out)
    step = max(f, STRIP_PIXELS // max(wl, 1) // f * f)
    thumb = np.concatenate([np.asarray(Image.fromarray(rgb(slide.read_region(
        (0, round(top * ds)), level, (wl, min(step, hl - top))))).reduce(f)) for top in range(0, hl, step)])
    sat = np.asarray(Image.fromarray(thumb).convert("HSV").getchannel("S").filter(ImageFilter.MedianFilter(MEDIAN)))
    threshold = otsu(sat)
    integral = np.zeros((sat.shape[0] + 1, sat.shape[1] + 1), np.int32)  # of the mask: a box's sum in 4 lookups
    integral[1:, 1:] = (sat > threshold).cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    spans = []  # [start, end) in thumbnail px of the tiles along each axis
    for n, scale, size in zip(geo.grid.shape, (geo.height / full_h * f, geo.width / full_w * f), sat.shape,
                              strict=True):
        start = np.arange(n) * geo.stride
        lo = np.clip(np.round(start / scale).astype(int), 0, size - 1)
        spans.append((lo, np.clip(np.round((start + geo.tile) / scale).astype(int), lo + 1, size)))
    (y0, y1), (x0, x1) = spans
    inside = integral[np.ix_(y1, x1)] - integral[np.ix_(y0, x1)] - integral[np.ix_(y1, x0)] + integral[np.ix_(y0, x0)]
    return Tissue(thumb, threshold, (inside / np.outer(y1 - y0, x1 - x0)).ravel())


def otsu(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (tissue: above it), never below MIN_SATURATION; when even the class below
    it is saturated (a slide without glass), every value above MIN_SATURATION is tissue."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    w0, m = np.cumsum(hist), np.cumsum(hist * np.arange(256))
    mu0, mu1 = m / np.maximum(w0, 1), (m[-1] - m) / np.maximum(w0[-1] - w0, 1)
    t = int(np.argmax(w0 * (w0[-1] - w0) * (mu0 - mu1) ** 2))
    return MIN_SATURATION if mu0[t] >= MIN_SATURATION else max(t, MIN_SATURATION)


def tile_batches(slide: openslide.OpenSlide, geo: Geometry, indices: np.ndarray, batch_size: int, workers: int,
                 name: str) -> Iterator[Batch]:
    """Grid tiles `indices` (uint8, geo.read px), `batch_size` at a time in order: `workers` threads read the next
    batches (OpenSlide decodes without the GIL) while the caller runs the model on this one."""

    def read(part: np.ndarray) -> Batch:
        out = np.empty((len(part), geo.read, geo.read, 3), np.uint8)
        for k, i in enumerate(part.tolist()):
            y, x = geo.grid.origin(i)
            try:
                out[k] = rgb(slide.read_region((x, y), geo.level, (geo.read, geo.read)))
            except openslide.OpenSlideError as err:
                raise SlideError(f"{name}: the tile at x={x}, y={y} could not be read ({err}); the slide is damaged "
                                 "(--skip-bad leaves it out)") from None
        return Batch(torch.from_numpy(out), [name] * len(part), part.tolist())

    with ThreadPoolExecutor(max(1, workers)) as pool:
        ahead: deque[Future[Batch]] = deque()
        for start in range(0, len(indices), batch_size):
            ahead.append(pool.submit(read, indices[start:start + batch_size]))
            if len(ahead) > workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


class TileStore:
    """P(tumour) of a slide's tiles while it is scored: chunk k (`<k>.txt`) holds scored tiles k·N … (k+1)·N − 1
    (N = --save-every), written atomically once complete, beside `run.json` (what they were made with). The same
    command run again reads them back and scores the rest in the same batches, so its probabilities are those of an
    uninterrupted run. A store made otherwise is refused, or discarded when `discard` (--overwrite)."""

    def __init__(self, folder: Path, made_with: dict[str, Any], discard: bool = False):
        self.folder, meta = folder, folder / "run.json"
        try:
            stored = json.loads(meta.read_text())
        except (OSError, ValueError):
            stored = None
        if meta.exists() and stored != made_with:
            if not discard:
                raise OutputError(f"{folder} holds tiles scored otherwise (checkpoint, settings, --mpp, --stride, "
                                  "--min-tissue, --threshold, --top-k, --save-every); pass --overwrite to score the "
                                  "slide again, or give another --out")
            shutil.rmtree(folder)
        if not meta.exists():
            disk.write_json(meta, made_with)

    def done(self) -> list[np.ndarray]:
        """The chunks saved so far, from the first."""
        chunks = []
        while (path := self.folder / f"{len(chunks)}.txt").is_file():
            chunks.append(np.array(path.read_text().split(), dtype=np.float64))
        return chunks

    def save(self, k: int, probs: np.ndarray) -> None:
        # A float's repr reads back exactly: the resumed CSV is byte for byte the uninterrupted one.
        disk.write_text(self.folder / f"{k}.txt", "".join(f"{float(p)!r}\n" for p in probs))

    def remove(self) -> None:
        # Renamed first: a kill during the removal leaves a temp name, which the next run's cleanup deletes.
        doomed = self.folder.with_name(f".{self.folder.name}{disk.TEMP_SUFFIX}")
        self.folder.rename(doomed)
        shutil.rmtree(doomed)
