"""pcamx.wsi on whole slides written here with tifffile (tiled pyramidal TIFFs with resolution tags, which OpenSlide
reads as generic TIFF), tiled from synthetic patches with tumour in a known area and glass around the tissue."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import REPO, compose_config, fast_overrides
from pcamx import wsi
from pcamx.checkpoint import INFERENCE_KEY, read_checkpoint, save_checkpoint
from pcamx.data.synthetic import generate_split
from pcamx.inference import slide as ws
from pcamx.inference.slide import PATCH, SlideError, geometry
from pcamx.pipeline import run

GLASS, NORMAL, TUMOUR = 0, 1, 2
PCAM_MPP = 0.972  # µm/px of the synthetic patches (they stand in for PCam's)


# ---------------------------------------------------------------- slides and a model


def layout(rows: int = 12, cols: int = 16, tumour: bool = True, margin: int = 2) -> np.ndarray:
    """(rows, cols) cells of 96 px: glass margins, normal tissue inside, a tumour ellipse in it."""
    cells = np.full((rows, cols), GLASS)
    cells[margin:rows - margin, margin:cols - margin] = NORMAL
    if tumour:
        yy, xx = np.mgrid[:rows, :cols]
        cells[((yy - rows / 2) / (rows / 4)) ** 2 + ((xx - cols / 2) / (cols / 4)) ** 2 <= 1] = TUMOUR
    return cells


@pytest.fixture(scope="module")
def patches() -> dict[int, np.ndarray]:
    """Synthetic patches by class (the synthetic stand-in's generator; labels with its few flips)."""
    images, labels = generate_split(480, seed=5, split="slide")
    rng = np.random.default_rng(0)
    glass = np.clip(242 + rng.normal(0, 2.0, (64, PATCH, PATCH, 3)), 0, 255).astype(np.uint8)
    return {GLASS: glass, NORMAL: images[labels.ravel() == 0], TUMOUR: images[labels.ravel() == 1]}


def paint(cells: np.ndarray, patches: dict[int, np.ndarray], seed: int = 0) -> np.ndarray:
    """The slide's level 0: each cell a patch of its class."""
    rng = np.random.default_rng(seed)
    rows, cols = cells.shape
    tiles = np.stack([patches[c][rng.integers(len(patches[c]))] for c in cells.ravel()])
    return tiles.reshape(rows, cols, PATCH, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(rows * PATCH, cols * PATCH, 3)


def write_slide(path: Path, image: np.ndarray, mpp: float | None, downsamples: tuple[int, ...] = (1, 2, 4),
                unit: str = "CENTIMETER") -> Path:
    """A tiled pyramidal TIFF, one page per level (box-reduced), its µm/px in the resolution tags (none: unit NONE)."""
    per_unit = {"CENTIMETER": 1e4, "INCH": 25_400.0}.get(unit, 1e4)
    resolution = (per_unit / (mpp or 1.0),) * 2
    with tifffile.TiffWriter(path) as tif:
        for k, d in enumerate(downsamples):
            level = image if d == 1 else np.asarray(Image.fromarray(image).reduce(d))
            tif.write(level, tile=(128, 128), photometric="rgb", resolution=resolution,
                      resolutionunit=unit if mpp else "NONE", subfiletype=1 if k else 0)
    return path


@pytest.fixture(scope="module")
def model_run(small_pcam: Path, tmp_path_factory) -> Path:
    """The demo's recipe (the tiny model, every weight trained, synthetic data) made small: 2 blocks, 32 px, a
    few epochs. It tells the synthetic tumour patches from normal ones (test AUROC ~0.9)."""
    run_dir = tmp_path_factory.mktemp("wsi") / "run"
    threads = torch.get_num_threads()
    try:  # one thread: on a shared 2-core machine this small model trains several times faster
        run(compose_config(*fast_overrides(small_pcam, "method=fullft", "train.epochs=6", "train.max_train_batches=0",
                                           "train.warmup_steps=4", "hardware.num_threads=1", "eval.tta_views=1",
                                           "+model.config.num_hidden_layers=2")), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory, patches) -> tuple[Path, np.ndarray, np.ndarray]:
    """(slide at PCam's µm/px, its cell layout, its level 0)."""
    cells = layout()
    image = paint(cells, patches)
    return write_slide(tmp_path_factory.mktemp("slides") / "tumour.tif", image, PCAM_MPP), cells, image


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory, patches) -> Path:
    """A quick one for the mechanics: 8 × 10 cells, glass around 6 × 8 of tissue with tumour in it."""
    return write_slide(tmp_path_factory.mktemp("slides") / "small.tif", paint(layout(8, 10, margin=1), patches, 1),
                       PCAM_MPP)


def score(*argv: object) -> int:
    return wsi.main([*map(str, argv), "--device", "cpu"])


@pytest.fixture(scope="module")
def tumour_scored(model_run: Path, tumour_slide, tmp_path_factory) -> Path:
    """DIR of `python -m pcamx.wsi` on the tumour slide (its folder: DIR/tumour)."""
    out = tmp_path_factory.mktemp("scored")
    assert score(model_run, tumour_slide[0], "--out", out) == 0
    return out


def tiles(folder: Path) -> list[dict[str, str]]:
    with open(folder / "tiles.csv") as f:
        return list(csv.DictReader(f))


def cell_of(row: dict[str, str], tile: int) -> tuple[int, int]:
    return int(row["y"]) // tile, int(row["x"]) // tile


# ---------------------------------------------------------------- magnification


@pytest.mark.parametrize("mpp, downsamples, tile, level, read", [
    (0.243, (1, 4, 16), 384, 1, 96),     # 40×: 96 · 0.972 / 0.243 = 384 px; level 1 (÷4) spans exactly 96 px
    (0.25, (1, 4, 16), 373, 0, 373),     # 96 · 0.972 / 0.25 = 373.2; on level 1 a tile is 93 px < 96: level 0
    (0.5, (1, 2, 4), 187, 0, 187),       # 20×: 186.6 px; on level 1 a tile is 94 px < 96
    (0.486, (1, 2, 4), 192, 1, 96),      # half of PCam's µm/px: level 1 is PCam's scale
    (0.486, (1, 3), 192, 0, 192),        # ÷3 would give 64 px: too coarse
    (0.972, (1, 2), 96, 0, 96),          # PCam's own scale
    (1.944, (1, 2), 48, 0, 48),          # a coarser scan: 48 px enlarged to 96 (nothing finer exists)
])
def test_tile_size_and_level_follow_the_magnification(mpp: float, downsamples: tuple, tile: int, level: int,
                                                      read: int) -> None:
    fake = SimpleNamespace(properties={"openslide.mpp-x": str(mpp)}, level_downsamples=tuple(map(float, downsamples)),
                           dimensions=(20_000, 10_000))
    geo = geometry(fake, Path("s.svs"), model_mpp=PCAM_MPP)
    assert (geo.tile, geo.level, geo.read, geo.stride, geo.mpp_source) == (tile, level, read, tile, "openslide.mpp-x")
    assert geometry(fake, Path("s.svs"), PCAM_MPP, stride=50).stride == 50
    # --mpp replaces the recorded value.
    assert geometry(fake, Path("s.svs"), PCAM_MPP, mpp=PCAM_MPP).tile == PATCH


def test_resolution_tags_give_openslide_the_mpp(tmp_path: Path, patches) -> None:
    image = paint(layout(4, 4, tumour=False, margin=0), patches)
    for unit in ("CENTIMETER", "INCH"):
        slide = ws.open_slide(write_slide(tmp_path / f"{unit}.tif", image, 0.486, unit=unit))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.486)
        assert slide.level_downsamples == (1.0, 2.0, 4.0)


# ---------------------------------------------------------------- tumour maps


def test_tile_probabilities_find_the_tumour_and_skip_glass(tumour_scored: Path, tumour_slide) -> None:
    cells, out = tumour_slide[1], tumour_scored
    rows = tiles(out / "tumour")
    scored = [cell_of(r, PATCH) for r in rows]
    # Exactly the tissue cells are scored (row by row), none of the glass margins.
    assert scored == [tuple(c) for c in np.argwhere(cells != GLASS)]
    assert {r["size"] for r in rows} == {str(PATCH)}
    assert min(float(r["tissue"]) for r in rows) > 0.9  # the blur rounds the tissue's corners a little
    truth = np.array([cells[c] == TUMOUR for c in scored])
    probs = np.array([float(r["prob"]) for r in rows])
    assert roc_auc_score(truth, probs) > 0.85
    record = json.loads((out / "tumour" / "slide.json").read_text())
    assert record["tiles"] == {"total": cells.size, "tissue": int((cells != GLASS).sum()),
                               "scored": int((cells != GLASS).sum()), "tumour": sum(r["pred"] == "1" for r in rows)}
    assert (record["level"], record["tile"], record["mpp"]) == (0, PATCH, pytest.approx(PCAM_MPP))
    assert record["score"]["max"] == pytest.approx(probs.max(), abs=1e-8)
    assert record["score"]["top_k_mean"] == pytest.approx(np.sort(probs)[-10:].mean(), abs=1e-8)
    assert [int(r["pred"]) for r in rows] == [int(p >= record["threshold"]) for p in probs]
    for png in ("heatmap.png", "overlay.png"):
        with Image.open(out / "tumour" / png) as img:
            assert img.format == "PNG"
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [(s["slide"], s["status"], float(s["max_prob"])) for s in summary] == [
        ("tumour", "scored", pytest.approx(probs.max()))]


@pytest.mark.parametrize("downsamples, level", [((1, 2, 4), 1), ((1,), 0)])
def test_twice_the_pixels_gives_the_same_tiles_and_close_probabilities(model_run: Path, tumour_slide, tumour_scored,
                                                                       tmp_path: Path, downsamples: tuple,
                                                                       level: int) -> None:
    image = tumour_slide[2]
    big = np.asarray(Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.BILINEAR))
    fine = write_slide(tmp_path / "fine.tif", big, PCAM_MPP / 2, downsamples)
    assert score(model_run, fine, "--out", tmp_path / "out") == 0
    base, twice = tiles(tumour_scored / "tumour"), tiles(tmp_path / "out" / "fine")
    assert [cell_of(r, PATCH) for r in base] == [cell_of(r, 2 * PATCH) for r in twice]
    assert {r["size"] for r in twice} == {str(2 * PATCH)}
    assert json.loads((tmp_path / "out" / "fine" / "slide.json").read_text())["level"] == level
    p, q = (np.array([float(r["prob"]) for r in rows]) for rows in (base, twice))
    # Close relative to how much the probabilities vary between tiles (this small model's stay near 0.5).
    assert np.corrcoef(p, q)[0, 1] > 0.9 and np.abs(p - q).mean() < 0.25 * p.std()
    cells = tumour_slide[1]
    assert roc_auc_score([cells[cell_of(r, 2 * PATCH)] == TUMOUR for r in twice], q) > 0.85


def test_tissue_fraction_of_tiles_straddling_the_edge(model_run: Path, tmp_path: Path, patches) -> None:
    cells = layout(8, 8, tumour=False)
    path = write_slide(tmp_path / "s.tif", paint(cells, patches), PCAM_MPP)
    assert score(model_run, path, "--out", tmp_path / "out", "--stride", PATCH // 2, "--min-tissue", 0.2) == 0
    tissue = np.kron(cells != GLASS, np.ones((PATCH, PATCH)))  # level-0 truth, pixel by pixel
    for row in tiles(tmp_path / "out" / "s"):
        x, y = int(row["x"]), int(row["y"])
        assert float(row["tissue"]) == pytest.approx(tissue[y:y + PATCH, x:x + PATCH].mean(), abs=0.1)
        assert tissue[y:y + PATCH, x:x + PATCH].mean() >= 0.2 - 0.1
    n = len(tiles(tmp_path / "out" / "s"))
    # Half-tissue tiles at the edges (a quarter at the corners) are scored beside the 16 inner ones at stride 48.
    full, grid = 4 * 2 - 1, (8 * 2 - 1)
    assert n == (full + 2) ** 2 and json.loads((tmp_path / "out" / "s" / "slide.json").read_text())["tiles"][
        "total"] == grid ** 2


# ---------------------------------------------------------------- refusals


def test_a_slide_without_mpp_is_refused_unless_mpp_is_given(model_run: Path, small_slide: Path, tmp_path: Path,
                                                             capsys) -> None:
    with ws.open_slide(small_slide) as slide:
        image = ws.rgb(slide.read_region((0, 0), 0, slide.dimensions))
    bare = write_slide(tmp_path / "bare.tif", image, None)
    assert score(model_run, bare, "--out", tmp_path / "a") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pcamx.wsi: error:") and "--mpp" in err and "bare.tif" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a" / "bare").exists()
    assert score(model_run, bare, small_slide, "--out", tmp_path / "b", "--mpp", PCAM_MPP) == 0
    assert json.loads((tmp_path / "b" / "bare" / "slide.json").read_text())["mpp_source"] == "--mpp"
    assert [r["prob"] for r in tiles(tmp_path / "b" / "bare")] == [r["prob"] for r in tiles(tmp_path / "b" / "small")]


def test_blank_and_unreadable_slides_stop_or_are_skipped(model_run: Path, small_slide: Path, tmp_path: Path,
                                                         capsys) -> None:
    glass = np.clip(242 + np.random.default_rng(1).normal(0, 2, (6 * PATCH, 6 * PATCH, 3)), 0, 255).astype(np.uint8)
    blank = write_slide(tmp_path / "blank.tif", glass, PCAM_MPP)
    (tmp_path / "broken.svs").write_bytes(b"not a slide")
    assert score(model_run, small_slide, blank, "--out", tmp_path / "a") == 2
    assert "no tissue" in capsys.readouterr().err and not (tmp_path / "a" / "blank").exists()
    assert (tmp_path / "a" / "small" / "slide.json").is_file()  # the slide before it is finished
    assert score(model_run, tmp_path / "broken.svs", small_slide, "--out", tmp_path / "b") == 2
    assert "broken.svs could not be read by OpenSlide" in capsys.readouterr().err
    assert not (tmp_path / "b" / "small").exists()  # every slide is opened before any is scored
    assert score(model_run, tmp_path / "broken.svs", blank, small_slide, "--out", tmp_path / "c", "--skip-bad") == 0
    summary = {r["slide"]: r for r in csv.DictReader(open(tmp_path / "c" / "summary.csv"))}
    assert [summary[s]["status"] for s in ("broken", "blank", "small")] == ["skipped", "skipped", "scored"]
    assert "no tissue" in summary["blank"]["reason"]
    assert "skipped blank" in capsys.readouterr().err
    assert score(model_run, blank, "--out", tmp_path / "d", "--no-tissue-mask") == 0  # glass scored when asked
    assert len(tiles(tmp_path / "d" / "blank")) == 36


def test_a_slide_without_glass_is_all_tissue(model_run: Path, tmp_path: Path, patches) -> None:
    # Otsu would split the tissue itself into two classes; nothing there is glass.
    path = write_slide(tmp_path / "full.tif", paint(layout(4, 5, tumour=False, margin=0), patches), PCAM_MPP)
    assert score(model_run, path, "--out", tmp_path) == 0
    assert [float(r["tissue"]) for r in tiles(tmp_path / "full")] == [1.0] * 20


def test_bad_arguments_and_outputs_exit_2_before_any_work(model_run: Path, small_slide: Path, tmp_path: Path,
                                                          capsys) -> None:
    path = small_slide
    (tmp_path / "file").write_text("")
    for argv, message in ([(path, "--out", tmp_path / "file"), "--out"],
                          [(path, "--out", tmp_path / "o", "--min-tissue", 1.5), "--min-tissue"],
                          [(path, "--out", tmp_path / "o", "--mpp", 0), "--mpp"],
                          [(tmp_path / "missing.svs", "--out", tmp_path / "o"), "missing.svs does not exist"],
                          [(tmp_path / "o", "--out", tmp_path / "p"), "without slides"]):
        (tmp_path / "o").mkdir(exist_ok=True)
        assert score(model_run, *argv) == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------- resuming


class Killed(Exception):
    """Stands in for a kill: raised from inside the run."""


def test_killed_and_rerun_gives_the_uninterrupted_tiles(model_run: Path, small_slide: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    args = (model_run, small_slide, "--save-every", 8, "--batch-size", 4)
    assert score(*args, "--out", tmp_path / "whole") == 0
    save = ws.TileStore.save

    def dies_after_two(self, k: int, probs: np.ndarray) -> None:
        save(self, k, probs)
        if k == 1:
            raise Killed

    monkeypatch.setattr(ws.TileStore, "save", dies_after_two)
    with pytest.raises(Killed):
        score(*args, "--out", tmp_path / "cut")
    monkeypatch.undo()
    cut = tmp_path / "cut" / "small"
    assert sorted(p.name for p in (cut / "partial").iterdir()) == ["0.txt", "1.txt", "run.json"]
    assert not (cut / "slide.json").exists()
    assert score(*args, "--out", tmp_path / "cut") == 0
    for name in ("tiles.csv", "tiles.geojson"):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / "small" / name).read_bytes()
    assert json.loads((cut / "slide.json").read_text())["resumed_tiles"] == 16 and not (cut / "partial").exists()


def test_finished_slides_are_skipped_unless_overwrite(model_run: Path, small_slide: Path, tmp_path: Path,
                                                      capsys) -> None:
    assert score(model_run, small_slide, "--out", tmp_path) == 0
    done = tmp_path / "small" / "slide.json"
    before = done.stat().st_mtime_ns
    assert score(model_run, small_slide, "--out", tmp_path) == 0
    assert done.stat().st_mtime_ns == before
    assert score(model_run, small_slide, "--out", tmp_path, "--threshold", "0.5") == 2  # made otherwise: not mixed in
    assert "--overwrite" in capsys.readouterr().err
    assert score(model_run, small_slide, "--out", tmp_path, "--threshold", "0.5", "--overwrite") == 0
    assert json.loads(done.read_text())["threshold"] == 0.5


# ---------------------------------------------------------------- exports and slide-level evaluation


def test_geojson_polygons_are_the_scored_tiles(model_run: Path, small_slide: Path, tmp_path: Path) -> None:
    assert score(model_run, small_slide, "--out", tmp_path) == 0
    collection = json.loads((tmp_path / "small" / "tiles.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    rows = tiles(tmp_path / "small")
    assert len(collection["features"]) == len(rows)
    for feature, row in zip(collection["features"], rows, strict=True):
        x, y, s = int(row["x"]), int(row["y"]), int(row["size"])
        assert feature["geometry"] == {"type": "Polygon",
                                       "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]}
        assert feature["properties"]["prob"] == pytest.approx(float(row["prob"]), abs=1e-8)
        tumour = feature["properties"].get("classification", {}).get("name") == "Tumor"
        assert tumour == (row["pred"] == "1")


def test_labels_give_a_slide_level_auroc(model_run: Path, tmp_path: Path, patches, capsys) -> None:
    truth = {}
    (tmp_path / "slides").mkdir()
    for k in range(4):
        tumour = k % 2 == 0
        write_slide(tmp_path / "slides" / f"s{k}.tif", paint(layout(6, 6, tumour=tumour, margin=1), patches, seed=k),
                    PCAM_MPP)
        truth[f"s{k}"] = int(tumour)
    (tmp_path / "labels.csv").write_text("slide,label\n" + "".join(f"{name}.tif,{v}\n" for name, v in truth.items()))
    assert score(model_run, tmp_path / "slides", "--out", tmp_path / "out", "--labels", tmp_path / "labels.csv",
                 "--top-k", 3) == 0
    summary = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [(r["slide"], int(r["label"])) for r in summary] == list(truth.items())
    result = json.loads((tmp_path / "out" / "summary.json").read_text())["slide_auroc"]
    for score_name in ("max_prob", "top_k_mean"):
        expected = roc_auc_score([int(r["label"]) for r in summary], [float(r[score_name]) for r in summary])
        assert result[score_name]["auroc"] == pytest.approx(expected)
        lo, hi = result[score_name]["ci95"]
        assert lo <= expected <= hi
    assert result["slides"] == 4 and "slide AUROC (max_prob)" in capsys.readouterr().out


# ---------------------------------------------------------------- slow: a real kill, the real demo model


@pytest.mark.slow
def test_sigkill_and_rerun_gives_the_uninterrupted_tiles(model_run: Path, tmp_path: Path, patches) -> None:
    path = write_slide(tmp_path / "big.tif", paint(layout(16, 16), patches), PCAM_MPP)  # 144 tissue tiles
    cmd = [sys.executable, "-m", "pcamx.wsi", str(model_run), str(path), "--device", "cpu", "--save-every", "8",
           "--batch-size", "4", "--tta-views", "8"]
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], cwd=REPO, check=True, timeout=600)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "cut")], cwd=REPO)
    partial = tmp_path / "cut" / "big" / "partial"
    deadline = time.monotonic() + 300
    while not (partial / "2.txt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # 24 of 144 tiles saved: most of the slide is still to do
    proc.wait()
    assert not (tmp_path / "cut" / "big" / "slide.json").exists()
    subprocess.run([*cmd, "--out", str(tmp_path / "cut")], cwd=REPO, check=True, timeout=600)
    cut, whole = tmp_path / "cut" / "big" / "tiles.csv", tmp_path / "whole" / "big" / "tiles.csv"
    assert cut.read_bytes() == whole.read_bytes()
    assert json.loads((tmp_path / "cut" / "big" / "slide.json").read_text())["resumed_tiles"] >= 24


@pytest.mark.slow
def test_the_demo_model_finds_the_tumour(demo_run: Path, tumour_slide, tmp_path: Path) -> None:
    path, cells, _ = tumour_slide
    assert score(demo_run, path, "--out", tmp_path) == 0
    rows = tiles(tmp_path / "tumour")
    truth = [cells[cell_of(r, PATCH)] == TUMOUR for r in rows]
    assert roc_auc_score(truth, [float(r["prob"]) for r in rows]) > 0.9
    assert read_checkpoint(demo_run / "best.pt")[INFERENCE_KEY]["resolution"] == 96


def test_a_checkpoint_without_mpp_uses_pcams(model_run: Path, small_slide: Path, tmp_path: Path, caplog) -> None:
    payload = read_checkpoint(model_run / "best.pt")
    payload[INFERENCE_KEY].pop("mpp", None)
    save_checkpoint(payload, tmp_path / "old.pt")
    with caplog.at_level("INFO", logger="pcamx"):
        assert score(tmp_path / "old.pt", small_slide, "--out", tmp_path / "out") == 0
    assert "records no µm/px" in caplog.text
    assert json.loads((tmp_path / "out" / "small" / "slide.json").read_text())["tile"] == PATCH


def test_geometry_refuses_a_slide_without_mpp() -> None:
    fake = SimpleNamespace(properties={}, level_downsamples=(1.0,), dimensions=(1000, 1000))
    with pytest.raises(SlideError, match="--mpp"):
        geometry(fake, Path("s.svs"), PCAM_MPP)


def test_the_benchmarks_slide_is_a_true_pyramid(tmp_path: Path) -> None:
    from benchmarks.wsi import write_slide as write_big

    with ws.open_slide(write_big(tmp_path / "b.tif", 1024, tissue=0.5)) as slide:
        assert slide.level_downsamples == tuple(float(2 ** k) for k in range(6))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(PCAM_MPP)
        level0 = ws.rgb(slide.read_region((0, 0), 0, (1024, 1024)))
        for k in (1, 3):
            coarse = ws.rgb(slide.read_region((0, 0), k, (1024 >> k, 1024 >> k)))
            np.testing.assert_array_equal(coarse, np.asarray(Image.fromarray(level0).reduce(2 ** k)))
