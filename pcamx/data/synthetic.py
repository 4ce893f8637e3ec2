"""Synthetic stand-in for PCam in exactly the official layout (`python -m pcamx.data.synthetic --root DIR`): pink
stroma with purple nuclei, positives with an extra cluster of nuclei in the central 32x32 (where PCam puts the
label), overlapping densities and a few flipped labels, so a small model learns it well but never perfectly. Not
PCam data: the directory holds a `SYNTHETIC.json` marker and every run on it reports `data: synthetic`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from pcamx.data.layout import IMAGE_SHAPE, LABEL_SHAPE, META_COLUMNS, SPLITS, X_KEY, Y_KEY, file_name, meta_file_name
from pcamx.runtime import disk
from pcamx.runtime.conf import conf_defaults
from pcamx.runtime.locks import exclusive

MARKER = "SYNTHETIC.json"
_SPLIT_OFFSET = {"train": 0, "valid": 1, "test": 2}
_STROMA = torch.tensor([232.0, 170.0, 205.0])
_NUCLEUS = torch.tensor([70.0, 35.0, 115.0])
LABEL_NOISE = 0.03
# Patches per stand-in slide in the metadata CSV (PCam's test split: 32,768 patches from about 130 slides).
PATCHES_PER_SLIDE = 32
# Bump when the generator changes: cached directories made by another version are regenerated.
GENERATOR_VERSION = 3


def _nuclei_mask(centers: torch.Tensor, n: int, radius: float = 2.6) -> torch.Tensor:
    """Render nuclei as soft disks: impulses at the centers convolved with one disk kernel."""
    size = IMAGE_SHAPE[0]
    impulses = torch.zeros(n, 1, size, size)
    if len(centers):
        impulses[centers[:, 0], 0, centers[:, 1], centers[:, 2]] = 1.0
    k = int(np.ceil(radius)) + 1
    yy, xx = torch.meshgrid(torch.arange(-k, k + 1.0), torch.arange(-k, k + 1.0), indexing="ij")
    disk = torch.clamp(radius + 0.5 - torch.sqrt(yy**2 + xx**2), 0, 1)
    return torch.clamp(F.conv2d(impulses, disk[None, None], padding=k), 0, 1)[:, 0]


def _centers(counts: torch.Tensor, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    """(image index, y, x) for `counts[i]` nuclei in image i, uniform in [lo, hi)^2."""
    image = torch.repeat_interleave(torch.arange(len(counts)), counts)
    yx = torch.randint(lo, hi, (len(image), 2), generator=g)
    return torch.cat([image[:, None], yx], dim=1)


def generate_split(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """`n` class-balanced patches (N,96,96,3) uint8 and labels (N,1,1,1) uint8, deterministic in seed."""
    g = torch.Generator().manual_seed(seed * 1000 + _SPLIT_OFFSET.get(split, 3))
    labels = torch.zeros(n, dtype=torch.long)
    labels[torch.randperm(n, generator=g)[: n // 2]] = 1
    size = IMAGE_SHAPE[0]

    background = torch.poisson(torch.full((n,), 28.0), generator=g).long()
    # Cluster size varies per positive and overlaps with the background's central count.
    density = torch.rand(n, generator=g) * 10 + 6
    extra = torch.poisson(density, generator=g).long() * labels
    # Tumor-like nuclei are larger than the background ones (enlarged, crowded).
    mask = torch.maximum(
        _nuclei_mask(_centers(background, 0, size, g), n),
        _nuclei_mask(_centers(extra, 32, 64, g), n, radius=3.4),
    )

    # Low-frequency staining variation, then pixel noise, as on a real scanned slide.
    stain = F.interpolate(torch.randn(n, 3, 6, 6, generator=g), size=(size, size), mode="bilinear")
    stroma = _STROMA[None, :, None, None] + 12 * stain
    nuclei = _NUCLEUS[None, :, None, None] * (0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=g))
    img = stroma * (1 - mask[:, None]) + nuclei * mask[:, None]
    img = img + 6 * torch.randn(img.shape, generator=g)
    images = img.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    flip = torch.rand(n, generator=g) < LABEL_NOISE
    noisy = torch.where(flip, 1 - labels, labels)
    return images.numpy(), noisy.to(torch.uint8).numpy().reshape(n, *LABEL_SHAPE)


def synthetic_region(rows: int = 8, cols: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for a region of a slide: (rows·96, cols·96, 3) uint8 tiled from synthetic patches, tumour
    patches (label 1) inside an ellipse and normal ones outside; and that (rows, cols) 0/1 layout."""
    yy, xx = np.mgrid[:rows, :cols]
    layout = (((yy - rows * 0.45) / (rows * 0.3)) ** 2 + ((xx - cols * 0.6) / (cols * 0.25)) ** 2 <= 1).astype(np.uint8)
    images, labels = generate_split(4 * rows * cols, seed, split="region")
    labels = labels.reshape(-1)
    pools = {c: iter(images[labels == c]) for c in (0, 1)}
    tiles = np.stack([next(pools[int(c)]) for c in layout.reshape(-1)])
    size = IMAGE_SHAPE[0]
    region = tiles.reshape(rows, cols, size, size, 3).transpose(0, 2, 1, 3, 4).reshape(rows * size, cols * size, 3)
    return np.ascontiguousarray(region), layout


def _write_h5(path: Path, key: str, array: np.ndarray) -> None:
    # Same dataset name, dtype, shape and gzip-chunked storage as the official files.
    chunks = (min(len(array), 64), *array.shape[1:]) if len(array) else None
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=array, chunks=chunks, compression="gzip", compression_opts=1)


def write_meta(path: Path, labels: np.ndarray, split: str, seed: int) -> None:
    """The split's metadata CSV in the official columns: consecutive runs of PATCHES_PER_SLIDE patches share
    a stand-in slide id (`synthetic_<split>_<k>`), at random coordinates; tumor flags follow the labels."""
    rng = np.random.default_rng(seed * 1000 + _SPLIT_OFFSET.get(split, 3))
    rows = [",".join(META_COLUMNS)]
    for i, label in enumerate(labels.reshape(-1).tolist()):
        y, x = rng.integers(0, 100_000, size=2).tolist()
        rows.append(f"{y},{x},{bool(label)},{bool(label)},synthetic_{split}_{i // PATCHES_PER_SLIDE:04d}")
    path.write_text("\n".join(rows) + "\n")


def write_synthetic(root: str | Path, sizes: dict[str, int], seed: int) -> Path:
    """Write all nine files under `root` (atomically: a temp dir is renamed into place)."""
    root = Path(root)
    with disk.atomic_dir(root) as tmp:
        for split in SPLITS:
            x, y = generate_split(sizes[split], seed, split)
            _write_h5(tmp / file_name(split, X_KEY), X_KEY, x)
            _write_h5(tmp / file_name(split, Y_KEY), Y_KEY, y)
            write_meta(tmp / meta_file_name(split), y, split, seed)
        spec = {
            "synthetic": True, "version": GENERATOR_VERSION, "seed": seed, "sizes": sizes, "label_noise": LABEL_NOISE
        }
        (tmp / MARKER).write_text(json.dumps(spec, indent=2) + "\n")
    return root


def _matches(root: Path, sizes: dict[str, int], seed: int) -> bool:
    try:
        spec = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (spec.get("version"), spec.get("seed"), spec.get("sizes")) == (GENERATOR_VERSION, seed, sizes)


def ensure_synthetic(root: str | Path, sizes: dict[str, int], seed: int) -> Path:
    """Generate on first use; reuse a cached directory made with the same sizes and seed. Concurrent runs
    that ask for the same directory generate it once: the others wait for it and use it."""
    root = Path(root).expanduser()
    if _matches(root, sizes, seed):
        return root
    with exclusive(root.parent / f".{root.name}.lock", f"generating {root}"):
        if _matches(root, sizes, seed):  # made by the process we waited for
            return root
        return write_synthetic(root, sizes, seed)


def is_synthetic(root: str | Path) -> bool:
    return (Path(root) / MARKER).is_file()


def main(argv: list[str] | None = None) -> None:
    defaults = conf_defaults("data", "synthetic")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="output directory")
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--region", help="instead: write a synthetic region (PNG) of --grid patches, a tumour "
                                         "ellipse among normal tissue, for `pcamx.predict --region`")
    parser.add_argument("--grid", default="8x12", help="--region: ROWSxCOLS patches of 96 px")
    for split in SPLITS:
        parser.add_argument(f"--n-{split}", type=int, default=defaults[f"n_{split}"], help=f"{split} patches")
    args = parser.parse_args(argv)
    if args.region:
        from PIL import Image

        rows, cols = (int(v) for v in args.grid.lower().split("x"))
        region, layout = synthetic_region(rows, cols, args.seed)
        with disk.atomic_path(args.region) as tmp:
            Image.fromarray(region).save(tmp, format="PNG")
        print(f"wrote a synthetic region (not a slide) to {args.region}: {region.shape[1]}×{region.shape[0]} px, "
              f"{int(layout.sum())} of {layout.size} patches tumour")
        return
    if not args.root:
        parser.error("--root is required (or --region)")
    sizes = {s: getattr(args, f"n_{s}") for s in SPLITS}
    root = write_synthetic(args.root, sizes, args.seed)
    print(f"wrote synthetic PCam-layout files (not PCam data) to {root}: {sizes}")


if __name__ == "__main__":
    main()
