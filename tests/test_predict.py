"""pcamx.predict on a user's own patches and regions, and the operating points that travel with every model."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config, fast_overrides, read_predictions
from pcamx import predict as cli
from pcamx.checkpoint import INFERENCE_KEY, OPERATING_POINTS_KEY, read_checkpoint, save_checkpoint
from pcamx.data.pcam import split_paths
from pcamx.evaluation.operating_points import (
    choose_thresholds,
    rates_at,
    resolve_threshold,
    specificity_threshold,
    threshold_metrics,
    thresholds_of,
    youden_threshold,
)
from pcamx.inference.inputs import InputError, Skipped, batches, discover
from pcamx.inference.region import MAX_PIXELS, TileGrid, read_region, tile_batches
from pcamx.pipeline import run
from pcamx.runtime import run_files

# ---------------------------------------------------------------- thresholds against direct counting


def _direct_rates(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    called = [pi >= t for pi in p]
    tp = sum(1 for c, yi in zip(called, y, strict=True) if c and yi == 1)
    tn = sum(1 for c, yi in zip(called, y, strict=True) if not c and yi == 0)
    return tp / int((y == 1).sum()), tn / int((y == 0).sum())


def _candidates(p: np.ndarray) -> list[float]:
    return sorted(set(p.tolist())) + [float(np.nextafter(p.max(), np.inf))]


@pytest.mark.parametrize("seed", range(6))
def test_thresholds_are_the_best_by_direct_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    y = rng.integers(0, 2, n)
    y[:2] = (0, 1)
    # Coarse scores give ties; a shift makes the classes overlap partly.
    p = np.clip(np.round(rng.random(n) * 0.6 + 0.3 * y, 2 if seed % 2 else 6), 0, 1)
    rates = {t: _direct_rates(y, p, t) for t in _candidates(p)}

    t95 = specificity_threshold(y, p)
    admissible = [t for t, (_, spec) in rates.items() if spec >= 0.95]
    assert t95 == min(admissible)
    assert rates_at(y, p, t95)["specificity"] >= 0.95

    tj = youden_threshold(y, p)
    best_j = max(sens + spec - 1 for sens, spec in rates.values())
    sens, spec = _direct_rates(y, p, tj)
    assert sens + spec - 1 == pytest.approx(best_j, abs=1e-12)
    assert tj == max(t for t, (a, b) in rates.items() if a + b - 1 == pytest.approx(best_j, abs=1e-12))


def test_val95spec_threshold_reproduces_sens_at_95spec_on_the_same_patches() -> None:
    from pcamx.evaluation.metrics import sensitivity_at_specificity

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = rng.random(500) * 0.7 + 0.3 * y
    assert rates_at(y, p, specificity_threshold(y, p))["sensitivity"] == sensitivity_at_specificity(y, p)


def test_threshold_beyond_every_score_is_finite_and_calls_nothing() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([0.9, 0.2, 0.8, 0.1])  # every negative scores above every positive
    t = specificity_threshold(y, p)
    assert np.isfinite(t) and t > 0.9
    assert rates_at(y, p, t) == {"threshold": t, "sensitivity": 0.0, "specificity": 1.0}
    # Youden's J is <= 0 everywhere but at "call nothing" (J = 0, the first ROC point): also finite.
    tj = youden_threshold(y, p)
    assert np.isfinite(tj) and tj > 0.9


def test_thresholds_travel_through_validation_metrics() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    p = rng.random(300) * 0.6 + 0.3 * y
    flat = threshold_metrics(y, p)
    assert set(flat) == {"threshold_youden", "threshold_val95spec"}
    assert thresholds_of({"auroc": 0.9, **flat}) == choose_thresholds(y, p)
    assert thresholds_of({"auroc": 0.9}) == {"0.5": 0.5}


def test_resolve_threshold_names_numbers_and_errors() -> None:
    points = {"thresholds": {"0.5": 0.5, "youden": 0.42, "val95spec": 0.77}}
    assert resolve_threshold("youden", points) == 0.42
    assert resolve_threshold("val95spec", points) == 0.77
    assert resolve_threshold("0.5", None) == 0.5
    assert resolve_threshold("0.3", None) == 0.3
    assert resolve_threshold("0", None) == 0.0 and resolve_threshold("1", None) == 1.0  # both ends allowed
    with pytest.raises(ValueError, match="^old.pt stores no 'youden'.*--threshold 0.5"):
        resolve_threshold("youden", None, where="old.pt")
    with pytest.raises(ValueError, match="^the checkpoint stores no 'val95spec'"):  # said of no file in particular
        resolve_threshold("val95spec", {"thresholds": {"youden": 0.42}})
    with pytest.raises(ValueError, match="one of 0.5, youden, val95spec"):
        resolve_threshold("yuoden", points)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resolve_threshold("1.5", points)


# ---------------------------------------------------------------- a trained run and its checkpoints


@pytest.fixture(scope="module")
def tiny_run(small_pcam: Path, tmp_path_factory) -> Path:
    """A few steps of the tiny model, evaluated with 8 TTA views, its thresholds chosen on validation."""
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    run(compose_config(*fast_overrides(small_pcam)), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def test_patches(small_pcam: Path) -> np.ndarray:
    with h5py.File(split_paths(small_pcam, "test")[0], "r") as f:
        return f["x"][:]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _predict(*argv: str) -> int:
    return cli.main([*map(str, argv), "--device", "cpu"])


def test_pngs_of_test_patches_reproduce_the_runs_predictions(tiny_run: Path, test_patches: np.ndarray,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "pngs"
    (folder / "nested").mkdir(parents=True)
    for i, patch in enumerate(test_patches):
        Image.fromarray(patch).save(folder / ("nested" if i % 3 == 0 else "") / f"{i:04d}.png")
    out = tmp_path / "preds.csv"
    assert _predict(tiny_run, folder, "--out", out, "--batch-size", 64) == 0
    rows = _read_csv(out)
    assert list(rows[0]) == ["source", "index", "prob", "pred"]
    by_file = {Path(r["source"]).stem: float(r["prob"]) for r in rows}
    _, expected = read_predictions(tiny_run / "predictions.csv")
    assert len(by_file) == len(expected)
    np.testing.assert_allclose([by_file[f"{i:04d}"] for i in range(len(expected))], expected, atol=2e-7)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["settings"] == {"resolution": 32, "tta_views": 8, "precision": "fp32", "quant": "none", "mpp": 0.972}
    assert record["trained_on"] == "synthetic" and "synthetic" in record["note"]


def test_h5_and_npy_inputs_agree_with_the_run(tiny_run: Path, small_pcam: Path, test_patches: np.ndarray,
                                              tmp_path: Path) -> None:
    np.save(tmp_path / "patches.npy", test_patches)
    h5 = split_paths(small_pcam, "test")[0]
    assert _predict(tiny_run, h5, tmp_path / "patches.npy", "--out", tmp_path / "p.csv", "--batch-size", 50) == 0
    rows = _read_csv(tmp_path / "p.csv")
    n = len(test_patches)
    assert [r["source"] for r in rows] == [str(h5)] * n + [str(tmp_path / "patches.npy")] * n
    assert [int(r["index"]) for r in rows] == list(range(n)) * 2
    probs = np.array([float(r["prob"]) for r in rows])
    _, expected = read_predictions(tiny_run / "predictions.csv")
    np.testing.assert_allclose(probs[:n], expected, atol=2e-7)
    np.testing.assert_allclose(probs[:n], probs[n:], atol=2e-7)  # batches straddle the two files


def test_run_stores_thresholds_chosen_on_validation_and_reports_test_rates(tiny_run: Path, small_pcam: Path,
                                                                           tmp_path: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    points = metrics["operating_points"]
    assert points["split"] == "valid" and points["measured_with"]["tta_views"] == 8
    # The thresholds are those of the model's own validation predictions (predicted here independently).
    assert _predict(tiny_run, split_paths(small_pcam, "valid")[0], "--out", tmp_path / "v.csv") == 0
    val_probs = np.array([float(r["prob"]) for r in _read_csv(tmp_path / "v.csv")])
    with h5py.File(split_paths(small_pcam, "valid")[1], "r") as f:
        val_labels = f["y"][:].reshape(-1)
    assert points["n"] == len(val_labels)
    chosen = choose_thresholds(val_labels, val_probs)
    for name, t in points["thresholds"].items():
        assert t == pytest.approx(chosen[name], abs=1e-6)
    # Test sensitivity/specificity at that threshold, by direct counting over predictions.csv.
    labels, probs = read_predictions(tiny_run / "predictions.csv")
    sens, spec = _direct_rates(labels, probs, points["thresholds"]["val95spec"])
    assert metrics["sens_at_val95spec_threshold"] == pytest.approx(sens, abs=1e-12)
    assert metrics["spec_at_val95spec_threshold"] == pytest.approx(spec, abs=1e-12)
    # best.pt (this run's final model) carries the same record; last.pt its own validation pass's.
    best = read_checkpoint(tiny_run / "best.pt")
    assert best[OPERATING_POINTS_KEY] == points
    assert best[INFERENCE_KEY] == {"resolution": 32, "tta_views": 8, "precision": "fp32", "quant": "none", "mpp": 0.972}
    last = read_checkpoint(tiny_run / "last.pt")
    assert last[OPERATING_POINTS_KEY]["measured_with"]["tta_views"] == 1  # eval.val_tta=false
    assert last[OPERATING_POINTS_KEY]["thresholds"]["youden"] == last["val_metrics"]["threshold_youden"]


@pytest.mark.parametrize("rule", ["val95spec", "youden", "0.5", "0.37"])
def test_predict_applies_the_stored_threshold(tiny_run: Path, test_patches: np.ndarray, tmp_path: Path,
                                              rule: str) -> None:
    np.save(tmp_path / "x.npy", test_patches)
    assert _predict(tiny_run, tmp_path / "x.npy", "--out", tmp_path / "p.csv", "--threshold", rule) == 0
    stored = read_checkpoint(tiny_run / "best.pt")[OPERATING_POINTS_KEY]["thresholds"]
    t = stored[rule] if rule in stored else float(rule)
    rows = _read_csv(tmp_path / "p.csv")
    assert [int(r["pred"]) for r in rows] == [int(float(r["prob"]) >= t) for r in rows]
    assert json.loads((tmp_path / "p.json").read_text())["threshold"]["value"] == t


def test_a_stored_threshold_made_with_other_views_is_named(tiny_run: Path, test_patches: np.ndarray,
                                                           tmp_path: Path, caplog) -> None:
    np.save(tmp_path / "x.npy", test_patches[:8])
    assert _predict(tiny_run, tmp_path / "x.npy", "--out", tmp_path / "p.csv", "--threshold", "youden",
                    "--tta-views", "1") == 0
    assert "tta_views': 8" in caplog.text and "--tta-views" in caplog.text
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["settings"]["tta_views"] == 1 and "warning" in record["threshold"]


@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_compressed_and_quantized_runs_predict_as_they_were_evaluated(small_pcam: Path, tmp_path: Path,
                                                                      test_patches: np.ndarray, quant: str) -> None:
    run_dir = tmp_path / "run"
    run(compose_config(*fast_overrides(small_pcam, "prune=all",
                                       "prune.tau=0.9", f"quant={quant}", "eval.tta_views=6")), run_dir)
    spec = json.loads((run_dir / "compressed" / run_files.ARCHITECTURE).read_text())
    assert spec["extra"][INFERENCE_KEY] == {"resolution": 32, "tta_views": 6, "precision": "fp32", "quant": quant,
                                            "mpp": 0.972}
    assert spec["extra"][OPERATING_POINTS_KEY] == json.loads((run_dir / "metrics.json").read_text())[
        "operating_points"]
    np.save(tmp_path / "x.npy", test_patches)
    assert _predict(run_dir, tmp_path / "x.npy", "--out", tmp_path / "p.csv", "--batch-size", 64) == 0
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["checkpoint"] == str(run_dir / "compressed") and record["settings"]["quant"] == quant
    _, expected = read_predictions(run_dir / "predictions.csv")
    np.testing.assert_allclose([float(r["prob"]) for r in _read_csv(tmp_path / "p.csv")], expected, atol=2e-7)


# ---------------------------------------------------------------- regions


def test_region_of_known_patches_gives_their_predictions(tiny_run: Path, test_patches: np.ndarray,
                                                         tmp_path: Path) -> None:
    rows, cols = 3, 4
    tiles = test_patches[: rows * cols]
    region = tiles.reshape(rows, cols, 96, 96, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 96, cols * 96, 3)
    Image.fromarray(region).save(tmp_path / "region.png")
    np.save(tmp_path / "tiles.npy", tiles)
    assert _predict(tiny_run, tmp_path / "tiles.npy", "--out", tmp_path / "patches.csv") == 0
    assert _predict(tiny_run, "--region", tmp_path / "region.png", "--tile", 96, "--out", tmp_path / "t.csv",
                    "--batch-size", 5) == 0
    got = _read_csv(tmp_path / "t.csv")
    assert list(got[0]) == ["source", "index", "row", "col", "y", "x", "prob", "pred"]
    expected = [float(r["prob"]) for r in _read_csv(tmp_path / "patches.csv")]
    np.testing.assert_allclose([float(r["prob"]) for r in got], expected, atol=2e-7)
    assert [(int(r["row"]), int(r["col"]), int(r["y"]), int(r["x"])) for r in got] == [
        (r, c, 96 * r, 96 * c) for r in range(rows) for c in range(cols)]
    png = tmp_path / "heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["grid"] == [rows, cols] and record["heatmap"] == str(png)


def test_tiles_with_overlap_are_the_image_windows() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (130, 200, 3), dtype=np.uint8)
    grid = TileGrid(130, 200, tile=64, stride=48)
    assert grid.shape == (2, 3) and len(grid) == 6
    batches = list(tile_batches(Image.fromarray(image), grid, 4, "r"))
    assert [b.images.dtype for b in batches] == [torch.uint8] * 2  # uint8 until the device
    assert [b.indices for b in batches] == [[0, 1, 2, 3], [4, 5]] and batches[0].sources == ["r"] * 4
    got = torch.cat([b.images for b in batches]).numpy()
    assert len(got) == len(grid)  # batches of 4 that run across rows of tiles
    for i in range(len(grid)):
        y, x = grid.origin(i)
        np.testing.assert_array_equal(got[i], image[y:y + 64, x:x + 64])
    with pytest.raises(InputError, match="does not fit"):
        TileGrid(50, 200, tile=64, stride=48)
    assert TileGrid(64, 200, tile=64, stride=1).shape == (1, 137)
    assert TileGrid(5, 5, tile=1, stride=1).shape == (5, 5)
    for tile, stride in ((0, 8), (8, 0), (-8, 8), (8, -1)):
        with pytest.raises(InputError, match="must be positive"):
            TileGrid(100, 100, tile=tile, stride=stride)


@pytest.mark.parametrize(("tile", "stride"), [(96, 96), (96, 48), (64, 40), (50, 70)])
def test_heatmap_cells_sit_on_their_tiles_centres(tile: int, stride: int) -> None:
    grid = TileGrid(400, 530, tile, stride)
    rows, cols = grid.shape
    left, right, bottom, top = grid.cell_extent()
    width, height = (right - left) / cols, (bottom - top) / rows
    assert width == height == stride
    for index in range(len(grid)):
        y, x = grid.origin(index)
        r, c = divmod(index, cols)
        assert (left + (c + 0.5) * width, top + (r + 0.5) * height) == (x + tile / 2, y + tile / 2)
    if tile == stride:
        assert grid.cell_extent() == (0, cols * tile, rows * tile, 0)


def test_a_region_above_the_pixel_limit_is_refused_before_decoding_unless_allowed(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (600, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "big.png")
    with pytest.raises(InputError, match=r"big.png is 40×600 = 0 Mpx, above the limit of 0 Mpx; decoding it takes "
                                         r"about 0.0 GB of memory. Pass --max-pixels 24000") as err:
        read_region(tmp_path / "big.png", max_pixels=23_999)
    assert "pcamx.wsi" in str(err.value)
    region = read_region(tmp_path / "big.png", max_pixels=24_000)
    np.testing.assert_array_equal(np.asarray(region), image)
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS  # Pillow's own limit is left on
    Image.fromarray(image[..., 0]).save(tmp_path / "grey.png")
    with pytest.raises(InputError, match="grey.png is a L image .1 channel.; pcamx models take RGB"):
        read_region(tmp_path / "grey.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "big.png").read_bytes()[:500])
    with pytest.raises(InputError, match="cut.png could not be read"):
        read_region(tmp_path / "cut.png")


def test_outputs_are_checked_before_any_work(tiny_run: Path, tmp_path: Path, test_patches: np.ndarray,
                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    np.save(tmp_path / "x.npy", test_patches[:4])
    monkeypatch.setattr(cli, "load_for_inference", lambda *a, **k: pytest.fail("loaded a model before checking"))
    for out, why in ((tmp_path / "missing" / "p.csv", "does not exist"), (tmp_path, "is a directory")):
        assert cli.main([str(tiny_run), str(tmp_path / "x.npy"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out}" in err[0] and why in err[0], err
    (tmp_path / "file").write_text("")
    assert cli.main([str(tiny_run), "--region", "r.png", "--out", str(tmp_path / "t.csv"),
                     "--heatmap", str(tmp_path / "file" / "h.png")]) == 2
    assert "--heatmap" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


def test_bad_inputs_are_named_and_can_be_skipped(tiny_run: Path, test_patches: np.ndarray, tmp_path: Path,
                                                 capsys) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(test_patches[0]).save(folder / "a_good.png")
    (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(test_patches[1][..., 0]).save(folder / "c_gray.png")
    Image.fromarray(test_patches[2]).save(folder / "d_good.jpg")
    assert _predict(tiny_run, folder, "--out", tmp_path / "p.csv") == 2
    assert "b_broken.png could not be read as an image" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()

    assert _predict(tiny_run, folder, "--out", tmp_path / "p.csv", "--skip-bad") == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "b_broken.png" in err and "c_gray.png" in err and "1 channel" in err
    assert [Path(r["source"]).name for r in _read_csv(tmp_path / "p.csv")] == ["a_good.png", "d_good.jpg"]
    skipped = json.loads((tmp_path / "p.json").read_text())["skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["b_broken.png", "c_gray.png"]


def _h5_without_x(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros(3))


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d.mkdir(), "folder without images"),
    (lambda d: np.save(d.with_suffix(".npy"), np.zeros((2, 96, 96), np.uint8)), "(N, H, W, 3) uint8"),
    (lambda d: np.save(d.with_suffix(".npy"), np.zeros((2, 96, 96, 3), np.float32)), "dtype float32"),
    (lambda d: _h5_without_x(d.with_suffix(".h5")), "no dataset 'x'"),
    (lambda d: d.with_suffix(".txt").write_text("hi"), "unsupported input .txt"),
    (lambda d: None, "does not exist"),
])
def test_unusable_inputs_name_the_file(tmp_path: Path, make, message: str) -> None:
    target = tmp_path / "input"
    make(target)
    path = next(iter(tmp_path.iterdir()), target)
    with pytest.raises(InputError, match=re.escape(message)) as err:
        discover([path])
    assert str(path) in str(err.value)
    skipped = Skipped()
    with pytest.raises(InputError, match="no patches to predict"):
        discover([path], skipped)
    assert skipped.items[0][0] == str(path) and re.search(re.escape(message), skipped.items[0][1])


@pytest.mark.parametrize(("shape", "dtype", "message"), [
    ((2, 96, 96, 4), np.uint8, "shape (2, 96, 96, 4)"),
    ((96, 96, 3), np.uint8, "shape (96, 96, 3)"),
    ((2, 96, 96, 3), np.uint16, "dtype uint16"),
    ((0, 96, 96, 3), np.uint8, "holds no patches"),
])
@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_arrays_of_the_wrong_layout_name_the_file(tmp_path: Path, shape, dtype, message: str, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    if suffix == ".npy":
        np.save(path, np.zeros(shape, dtype))
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=np.zeros(shape, dtype))
    with pytest.raises(InputError, match=re.escape(message)) as err:
        discover([path])
    assert str(err.value).startswith(str(path))


def test_discover_keeps_every_input_in_order_with_its_count(tmp_path: Path) -> None:
    n = 1024 + 6  # more rows than one slab
    np.save(tmp_path / "a.npy", np.arange(n * 27, dtype=np.uint8).reshape(n, 3, 3, 3))
    with h5py.File(tmp_path / "b_x.h5", "w") as f:
        f.create_dataset("x", data=np.ones((130, 4, 4, 3), np.uint8))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")  # ignored in a folder
    for name in ("z.PNG", "y.png"):
        Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(folder / name)
    Image.fromarray(np.full((5, 5, 3), 7, np.uint8)).save(tmp_path / "single.JPG")
    sources = discover([tmp_path / "a.npy", tmp_path / "single.JPG", tmp_path / "b_x.h5", folder])
    assert [(s.path.name, s.kind, s.count) for s in sources] == [
        ("a.npy", "npy", n), ("single.JPG", "image", 1), ("b_x.h5", "h5", 130), ("y.png", "image", 1),
        ("z.PNG", "image", 1)]
    got = list(batches(sources, batch_size=500))
    names = [Path(name).name for b in got for name in b.sources]
    indices = [i for b in got for i in b.indices]
    assert names == ["a.npy"] * n + ["single.JPG"] + ["b_x.h5"] * 130 + ["y.png", "z.PNG"]
    assert indices == [*range(n), 0, *range(130), 0, 0]
    first = torch.cat([b.images for b in got if b.sources[0].endswith("a.npy")])
    np.testing.assert_array_equal(first.numpy(), np.load(tmp_path / "a.npy"))


def test_images_of_different_sizes_are_batched_apart(tmp_path: Path) -> None:
    for i, size in enumerate((96, 96, 64, 96)):
        Image.fromarray(np.full((size, size, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    got = list(batches(discover([tmp_path]), batch_size=8))
    assert [tuple(b.images.shape) for b in got] == [(2, 96, 96, 3), (1, 64, 64, 3), (1, 96, 96, 3)]
    assert [b.images[:, 0, 0, 0].tolist() for b in got] == [[0, 1], [2], [3]]


def test_bad_checkpoints_and_arguments_exit_2_with_the_reason(tiny_run: Path, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 96, 96, 3), np.uint8))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert _predict(tmp_path / "junk.pt", tmp_path / "x.npy") == 2
    err = capsys.readouterr().err
    assert "junk.pt could not be read" in err and "weights_only" not in err  # no advice to run untrusted code
    assert _predict(tmp_path / "missing", tmp_path / "x.npy") == 2
    assert "does not exist" in capsys.readouterr().err
    assert _predict(tiny_run) == 2
    assert "either INPUT" in capsys.readouterr().err


def test_checkpoint_without_settings_uses_the_run_config_or_asks(tiny_run: Path, tmp_path: Path) -> None:
    payload = read_checkpoint(tiny_run / "best.pt")
    del payload[INFERENCE_KEY], payload[OPERATING_POINTS_KEY]
    old_run = tmp_path / "old"
    old_run.mkdir()
    save_checkpoint(payload, old_run / "best.pt")
    np.save(tmp_path / "x.npy", np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(Exception, match="--resolution"):
        cli.run(cli.parser().parse_args([str(old_run / "best.pt"), str(tmp_path / "x.npy")]))
    (old_run / "resolved_config.yaml").write_text((tiny_run / "resolved_config.yaml").read_text())
    record = cli.run(cli.parser().parse_args([str(old_run), str(tmp_path / "x.npy"), "--device", "cpu",
                                              "--out", str(tmp_path / "p.csv")]))
    assert record["settings"]["tta_views"] == 8 and record["settings"]["resolution"] == 32
    with pytest.raises(ValueError, match="stores no 'youden' threshold"):
        cli.run(cli.parser().parse_args([str(old_run), str(tmp_path / "x.npy"), "--threshold", "youden"]))


def test_synthetic_region_tiles_are_patches_of_the_layouts_class() -> None:
    from pcamx.data.synthetic import generate_split, synthetic_region

    region, layout = synthetic_region(4, 6, seed=1)
    assert region.shape == (4 * 96, 6 * 96, 3) and region.dtype == np.uint8
    assert 0 < layout.sum() < layout.size
    images, labels = generate_split(4 * 4 * 6, 1, split="region")
    label_of = {im.tobytes(): int(y) for im, y in zip(images, labels.reshape(-1), strict=True)}
    tiles = [region[96 * r:96 * (r + 1), 96 * c:96 * (c + 1)] for r in range(4) for c in range(6)]
    assert [label_of[t.tobytes()] for t in tiles] == layout.reshape(-1).tolist()
    assert len({t.tobytes() for t in tiles}) == len(tiles)


@pytest.mark.cuda
def test_predict_on_cuda_equals_the_cpu(tiny_run: Path, test_patches: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", test_patches)
    probs = {}
    for device in ("cpu", "cuda"):
        assert cli.main([str(tiny_run), str(tmp_path / "x.npy"), "--device", device,
                         "--out", str(tmp_path / f"{device}.csv")]) == 0
        probs[device] = [float(r["prob"]) for r in _read_csv(tmp_path / f"{device}.csv")]
    np.testing.assert_allclose(probs["cuda"], probs["cpu"], atol=1e-4)


def test_the_operating_points_record_as_metrics_json_and_checkpoints_store_it() -> None:
    from pcamx.evaluation.operating_points import operating_points

    settings = {"resolution": 96, "tta_views": 8, "precision": "fp32", "quant": "none"}
    record = operating_points({"0.5": 0.5, "val95spec": 0.78}, settings, n=1024)
    assert record == {"thresholds": {"0.5": 0.5, "val95spec": 0.78}, "split": "valid", "n": 1024,
                      "measured_with": settings}
    assert operating_points({"0.5": 0.5}, settings, split="test") == {
        "thresholds": {"0.5": 0.5}, "split": "test", "measured_with": settings}  # no patch count given, none stored
