"""heatmap.png of `pcamx.predict --region` and `pcamx.wsi`: P(tumour) of each tile over the image (or slide)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on clusters and CI without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pcamx.inference.region import TileGrid  # noqa: E402
from pcamx.runtime import disk  # noqa: E402

# The figure is drawn from a copy of the image at most this many pixels on its long side.
PREVIEW_PIXELS = 2048


def plot_heatmap(path: Path, grid: TileGrid, probs: np.ndarray, title: str, size: tuple[int, int],
                 background: Image.Image | np.ndarray | None = None, axes: str = "px") -> Path:
    """P(tumour) of each tile of `grid` (NaN: not scored, left blank) over an image of `size` (width, height) px,
    with a colour bar; over `background` (that image, or a thumbnail of it) when given."""
    width, height = size
    fig, ax = plt.subplots(figsize=(7, float(np.clip(7 * height / width, 2, 14)) + 0.6))
    if background is not None:
        step = max(1, int(np.ceil(max(np.shape(background)[:2]) / PREVIEW_PIXELS)))
        preview = background.reduce(step) if isinstance(background, Image.Image) else background[::step, ::step]
        ax.imshow(np.asarray(preview), extent=(0, width, height, 0))
    shown = ax.imshow(probs.reshape(grid.shape), cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest",
                      alpha=None if background is None else 0.55, extent=grid.cell_extent())
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="P(tumour)")
    # The whole image, margins the tiles do not cover included.
    ax.set(title=title, xlabel=f"x ({axes})", ylabel=f"y ({axes})", xlim=(0, width), ylim=(height, 0))
    fig.tight_layout()
    with disk.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
