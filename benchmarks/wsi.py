"""6. Whole slides: `python -m pcamx.wsi` beside the usual per-tile script (one `read_region` at level 0, RGB,
resize, one forward per TTA view) on the same slide, model and machine; its reading alone beside the model; its
peak memory on a 50,000² px slide. Slides are synthetic (not PCam, not a scan): 96-px cells at PCam's µm/px, each
a synthetic patch or glass, written tile by tile into a tiled pyramidal TIFF that OpenSlide reads. The model is
the demo recipe's (`experiment=demo`) after a few steps: speed and memory do not depend on how well it learned."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pcamx import wsi
from pcamx.config import compose, conf_defaults
from pcamx.data.synthetic import generate_split
from pcamx.data.transforms import tta_views
from pcamx.evaluation.evaluate import predict_batch
from pcamx.inference.scoring import as_patches
from pcamx.inference.settings import load_for_inference
from pcamx.inference.slide import PATCH, find_tissue, geometry, open_slide, tile_batches
from pcamx.pipeline import run
from pcamx.runtime.timing import measure

MPP = conf_defaults("data", "pcam")["mpp"]
TIFF_TILE, LEVELS, BATCH, WORKERS = 256, 6, 64, 4  # levels ÷1 … ÷32: a 96-px cell stays whole pixels on each


def write_slide(path: Path, size: int, tissue: float, seed: int = 0) -> Path:
    """A size × size px slide: glass around one round piece of tissue (about `tissue` of the area) with tumour in
    its upper left part; written tile by tile, so memory stays at a few tiles whatever the size."""
    import tifffile

    images, labels = generate_split(256, seed, split="bench-slide")
    glass = np.full((1, PATCH, PATCH, 3), 242, np.uint8)  # flat: compresses to nothing, as glass does in scans
    pools = [glass, images[labels.ravel() == 0], images[labels.ravel() == 1]]  # glass, normal, tumour
    n = -(-size // PATCH)
    yy, xx = np.mgrid[:n, :n] - n / 2
    radius = np.sqrt(tissue * n * n / np.pi)
    cells = np.where(np.hypot(yy, xx) <= radius, 1, 0)
    cells[np.hypot(yy + radius / 3, xx + radius / 3) <= radius / 3] = 2
    counts = np.array([len(p) for p in pools])
    ids = np.concatenate([[0], np.cumsum(counts)[:-1]])[cells] + \
        np.random.default_rng(seed).integers(0, 1 << 30, cells.shape) % counts[cells]
    flat = np.concatenate(pools)

    def tiles(level: int, side: int):
        d, cell = 1 << level, PATCH >> level
        patches = flat if d == 1 else np.stack([np.asarray(Image.fromarray(p).reduce(d)) for p in flat])
        for top, left in itertools.product(range(0, side, TIFF_TILE), repeat=2):  # row by row, as TIFF stores them
            ys, xs = np.arange(top, top + TIFF_TILE), np.arange(left, left + TIFF_TILE)
            cy, cx = np.minimum(ys // cell, n - 1), np.minimum(xs // cell, n - 1)
            yield patches[ids[np.ix_(cy, cx)], (ys % cell)[:, None], (xs % cell)[None, :]]

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(LEVELS):
            side = size >> level
            tif.write(tiles(level, side), shape=(side, side, 3), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE),
                      photometric="rgb", compression="zlib", compressionargs={"level": 1},
                      resolution=(1e4 / MPP / (1 << level),) * 2, resolutionunit="CENTIMETER",
                      subfiletype=1 if level else 0)
    return path


def per_tile_script(loaded, slide, geo, keep: np.ndarray, views: int, seconds: float) -> dict[str, Any]:
    position = iter(np.resize(keep, 1 << 20).tolist())

    def step() -> int:
        y, x = geo.grid.origin(next(position))
        image = slide.read_region((x, y), 0, (geo.tile,) * 2).convert("RGB").resize((PATCH,) * 2, Image.BILINEAR)
        with torch.no_grad():
            for view in tta_views(torch.from_numpy(np.array(image))[None], loaded.settings.resolution, views):
                torch.softmax(loaded.model(view[None]), dim=-1)[:, 1].item()
        return 1

    return {"tiles_per_s": measure(step, warmup=5, samples=3, seconds=seconds).rate}


def reading_and_model(loaded, slide, geo, keep: np.ndarray, views: int, seconds: float) -> dict[str, Any]:
    """pcamx.wsi's host side alone (`tile_batches`, `as_patches`); its model alone (`predict_batch`) on a batch."""
    start, n = time.perf_counter(), 0
    for batch in tile_batches(slide, geo, keep, BATCH, WORKERS, "medium"):
        n += len(as_patches(batch.images, PATCH))
    reading = n / (time.perf_counter() - start)
    images = torch.randint(0, 256, (BATCH, PATCH, PATCH, 3), dtype=torch.uint8)

    def forward() -> int:
        with torch.no_grad():
            predict_batch(loaded.model, images, loaded.settings.resolution, views)
        return BATCH

    model = measure(forward, warmup=1, samples=3, seconds=seconds).rate
    return {"reading_tiles_per_s": reading, "model_tiles_per_s": model, "views": views, "ratio": reading / model}


# The child reports its own high-water mark: ru_maxrss would also count the bench's pages it was forked from.
_PEAK = ("import runpy, sys\ntry:\n    runpy.run_module('pcamx.wsi', run_name='__main__', alter_sys=True)\nfinally:\n"
         "    print(*[ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')], file=sys.stderr)")


def section_wsi(b, results: dict[str, Any]) -> dict[str, Any]:
    root, quick = b.root.parent / "wsi", b.s.quick
    seconds, size = (1.0, 4096) if quick else (6.0, 50_000)
    checkpoint = root / "model"
    args = lambda slide, out, views: [str(checkpoint), str(slide), "--out", str(out), "--device", "cpu",  # noqa: E731
                                      "--tta-views", str(views), "--batch-size", str(BATCH), "--workers", str(WORKERS)]
    run(compose("experiment=demo", "debug=fast", "hardware=cpu", f"data.root={root / 'synthetic'}", "data.n_train=256",
                "data.n_valid=128", "data.n_test=128"), checkpoint)
    loaded = load_for_inference(checkpoint, "cpu")
    medium = write_slide(root / "medium.tif", 2048 if quick else 6144, tissue=0.4)
    slide, views = open_slide(medium), loaded.settings.tta_views
    geo = geometry(slide, medium, MPP)
    keep = np.flatnonzero(find_tissue(slide, geo).fraction >= wsi.parser().get_default("min_tissue"))
    sec: dict[str, Any] = {"checkpoint": str(checkpoint), "settings": loaded.settings.to_dict(), "data":
                           "synthetic slides (not PCam, not real scans)", "tissue_tiles": len(keep)}
    for v in sorted({1, views}):
        out = root / f"out-v{v}"
        wsi.run(wsi.parser().parse_args(args(medium, out, v)))
        pcamx = json.loads((out / medium.stem / "slide.json").read_text())["tiles_per_s"]
        usual = per_tile_script(load_for_inference(checkpoint, "cpu", tta_views=v), slide, geo, keep, v, seconds)
        sec[f"views_{v}"] = {"pcamx_tiles_per_s": pcamx, "per_tile": usual, "ratio": pcamx / usual["tiles_per_s"]}
    sec["reading"] = reading_and_model(loaded, slide, geo, keep, views, seconds)
    slide.close()
    big, env = write_slide(root / "big.tif", size, tissue=0.03), {**os.environ, "OMP_NUM_THREADS": str(
        torch.get_num_threads())}
    start, out = time.perf_counter(), root / "out-big"  # 1 view: reading does not depend on them; 8 take minutes
    done = subprocess.run([sys.executable, "-c", _PEAK, *args(big, out, 1)], env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode:
        raise RuntimeError(f"pcamx.wsi exited {done.returncode}: {done.stderr[-2000:]}")
    tiles = json.loads((out / big.stem / "slide.json").read_text())["tiles"]
    sec["big"] = {"size": size, "file_gb": big.stat().st_size / 1e9, "seconds": time.perf_counter() - start,
                  "peak_rss_gb": int(done.stderr.rsplit("VmHWM:", 1)[1].split()[0]) * 1024 / 1e9, "tiles": tiles}
    return sec


def render_wsi(sec: dict[str, Any]) -> list[str]:
    s, r, big = sec["settings"], sec["reading"], sec["big"]
    rows = [f"| {k.split('_')[1]} | {f['pcamx_tiles_per_s']:.1f} | {f['per_tile']['tiles_per_s']:.1f} | "
            f"{f['ratio']:.2f}× |" for k, f in sorted(sec.items()) if k.startswith("views_")]
    return [f"Model: the demo recipe's ({s['resolution']} px, {s['precision']}), {sec['data']}, {sec['tissue_tiles']} "
            "tissue tiles.\n\n| TTA views | pcamx.wsi tiles/s | per-tile script tiles/s | ratio |\n|---|---|---|---|",
            *rows, "",
            f"Reading + to 96 px (threads): {r['reading_tiles_per_s']:,.0f} tiles/s; the model alone ({r['views']} "
            f"views): {r['model_tiles_per_s']:.1f} tiles/s; ratio {r['ratio']:.1f}×.", "",
            f"Peak RSS of pcamx.wsi on a {big['size']:,}² px slide ({big['file_gb']:.2f} GB file, "
            f"{big['tiles']['total']:,} tiles, {big['tiles']['scored']:,} on tissue, 1 view, {big['seconds']:.0f} s): "
            f"**{big['peak_rss_gb']:.2f} GB**."]
