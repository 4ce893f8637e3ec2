"""heatmap.png of `pcamx.predict --region`: a region with P(tumour) of each tile over it."""

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


def plot_heatmap(path: Path, image: Image.Image, grid: TileGrid, probs: np.ndarray, title: str) -> Path:
    """The region with P(tumour) of each tile over it (the tile grid's extent), and a colour bar."""
    step = max(1, int(np.ceil(max(image.size) / PREVIEW_PIXELS)))
    preview = np.asarray(image.reduce(step))
    rows, cols = grid.shape
    height, width = image.height, image.width
    fig, ax = plt.subplots(figsize=(7, 7 * height / width + 0.6))
    ax.imshow(preview, extent=(0, width, height, 0))
    shown = ax.imshow(probs.reshape(rows, cols), cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.55,
                      extent=grid.cell_extent(), interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="P(tumour)")
    # The whole image, margins the tiles do not cover included.
    ax.set(title=title, xlabel="x (px)", ylabel="y (px)", xlim=(0, width), ylim=(height, 0))
    fig.tight_layout()
    with disk.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
