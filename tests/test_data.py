"""The official layout is enforced, splits load as uint8, and both loading modes serve the same data."""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import SMALL_SIZES
from pcamx.data import pcam
from pcamx.data.layout import META_COLUMNS, all_file_names, file_name, meta_file_name
from pcamx.data.pcam import PCamDataError, PCamSplit
from pcamx.data.synthetic import MARKER, PATCHES_PER_SLIDE, generate_split, is_synthetic, write_synthetic


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_synthetic_files_have_the_official_layout(small_pcam: Path) -> None:
    assert sorted(p.name for p in small_pcam.glob("*.[hc][5s]*")) == sorted(all_file_names())
    for split, n in SMALL_SIZES.items():
        with open(small_pcam / meta_file_name(split), newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == list(META_COLUMNS) and len(rows) == n
        labels = PCamSplit.load(small_pcam, split).labels.tolist()
        assert [r["tumor_patch"] == "True" for r in rows] == [bool(v) for v in labels]
        # Consecutive runs of patches share a stand-in slide.
        assert [r["wsi"] for r in rows] == [f"synthetic_{split}_{i // PATCHES_PER_SLIDE:04d}" for i in range(n)]
        with h5py.File(small_pcam / file_name(split, "x")) as f:
            assert list(f.keys()) == ["x"]
            assert f["x"].shape == (n, 96, 96, 3) and f["x"].dtype == np.uint8
        with h5py.File(small_pcam / file_name(split, "y")) as f:
            assert list(f.keys()) == ["y"]
            assert f["y"].shape == (n, 1, 1, 1) and f["y"].dtype == np.uint8
    assert is_synthetic(small_pcam) and (small_pcam / MARKER).is_file()


def test_synthetic_is_deterministic_and_class_balanced() -> None:
    x1, y1 = generate_split(200, seed=3, split="test")
    x2, y2 = generate_split(200, seed=3, split="test")
    x3, _ = generate_split(200, seed=4, split="test")
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    # Balanced before the 3% label noise: within a few flips of half.
    assert abs(int(y1.sum()) - 100) <= 15


def test_split_loads_uint8_images_and_squeezed_labels(small_pcam: Path) -> None:
    split = PCamSplit.load(small_pcam, "valid")
    assert split.images.dtype == torch.uint8 and split.images.shape == (128, 96, 96, 3)
    assert split.labels.shape == (128,) and set(split.labels.tolist()) <= {0, 1}
    with h5py.File(small_pcam / file_name("valid", "x")) as f:
        assert np.array_equal(split.images.numpy(), f["x"][:])
    with h5py.File(small_pcam / file_name("valid", "y")) as f:
        assert np.array_equal(split.labels.numpy(), f["y"][:].reshape(-1))


def test_streaming_and_in_memory_serve_the_same_samples(small_pcam: Path, monkeypatch) -> None:
    monkeypatch.setattr(pcam, "SLAB_ROWS", 48)  # several slabs, with batches straddling slab edges
    mem = PCamSplit.load(small_pcam, "train", in_memory=True)
    stream = PCamSplit.load(small_pcam, "train", in_memory=False)
    assert stream.images is None

    def collect(split: PCamSplit, shuffle: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        xs, ys = zip(*split.batches(40, shuffle=shuffle, generator=g), strict=True)
        return torch.cat(xs), torch.cat(ys)

    x_mem, y_mem = collect(mem, shuffle=False)
    x_stream, y_stream = collect(stream, shuffle=False)
    assert torch.equal(x_mem, x_stream) and torch.equal(y_mem, y_stream)

    x_shuf, y_shuf = collect(stream, shuffle=True)
    assert not torch.equal(x_shuf, x_mem)  # shuffled …
    key = lambda x: x.flatten(1)[:, :64].sum(1) * 1000 + x.flatten(1)[:, 64:128].sum(1)  # noqa: E731
    assert torch.equal(key(x_shuf).sort().values, key(x_mem).sort().values)  # … but every sample once
    assert y_shuf.sum() == y_mem.sum()


@pytest.mark.parametrize("in_memory", [True, False])
def test_drop_last_and_batch_count(small_pcam: Path, in_memory: bool) -> None:
    split = PCamSplit.load(small_pcam, "valid", in_memory=in_memory)
    assert [len(x) for x, _ in split.batches(50)] == [50, 50, 28]
    assert [len(x) for x, _ in split.batches(50, drop_last=True)] == [50, 50]
    assert split.num_batches(50) == 3 and split.num_batches(50, drop_last=True) == 2
    assert [len(x) for x, _ in split.batches(64)] == [64, 64]  # no empty batch after an exact fit


def test_defaults_read_everything_in_memory_in_order(small_pcam: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = pcam.SplitFiles.open(small_pcam, "valid")
    assert files.n == SMALL_SIZES["valid"]  # no limit unless asked
    split = PCamSplit.load(small_pcam, "valid")
    assert split.images is not None and PCamSplit(files).images is not None  # in memory unless asked to stream
    x, y = (torch.cat(parts) for parts in zip(*split.batches(50), strict=True))
    assert torch.equal(x, split.images) and torch.equal(y, split.labels)  # unshuffled unless asked

    def no_verify(self) -> None:
        raise AssertionError("verify_images runs only when asked")

    monkeypatch.setattr(pcam.SplitFiles, "verify_images", no_verify)
    assert PCamSplit.load(small_pcam, "valid", in_memory=False).images is None
    assert PCamSplit(files, in_memory=False).images is None


def test_read_images_fills_the_given_buffer(small_pcam: Path) -> None:
    files = pcam.SplitFiles.open(small_pcam, "valid")
    buffer = np.zeros((5, 96, 96, 3), dtype=np.uint8)
    assert files.read_images(3, 8, buffer) is buffer
    with h5py.File(small_pcam / file_name("valid", "x")) as f:
        assert np.array_equal(buffer, f["x"][3:8])


def test_missing_file_names_file_and_download_command(small_pcam: Path, tmp_path: Path) -> None:
    root = copy_root(small_pcam, tmp_path / "pcam")
    (root / file_name("test", "x")).unlink()
    with pytest.raises(PCamDataError) as err:
        PCamSplit.load(root, "test")
    assert file_name("test", "x") in str(err.value)
    assert f"python -m pcamx.data.download --root {root}" in str(err.value)


def test_wrong_shape_or_dtype_names_file_and_layout(small_pcam: Path, tmp_path: Path) -> None:
    root = copy_root(small_pcam, tmp_path / "pcam")
    bad = root / file_name("valid", "x")
    with h5py.File(bad, "w") as f:
        f.create_dataset("x", data=np.zeros((128, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(PCamDataError, match=r"(?s)valid_x\.h5.*\(N, 96, 96, 3\) uint8"):
        PCamSplit.load(root, "valid")
    with h5py.File(bad, "w") as f:
        f.create_dataset("x", data=np.zeros((128, 96, 96, 3), dtype=np.float32))
    with pytest.raises(PCamDataError, match="float32"):
        PCamSplit.load(root, "valid")
    with h5py.File(bad, "w") as f:
        f.create_dataset("images", data=np.zeros((128, 96, 96, 3), dtype=np.uint8))
    with pytest.raises(PCamDataError, match="no dataset 'x'"):
        PCamSplit.load(root, "valid")
    bad.write_bytes(b"not hdf5")
    with pytest.raises(PCamDataError, match="not a readable HDF5"):
        PCamSplit.load(root, "valid")


def test_x_and_y_lengths_must_agree(small_pcam: Path, tmp_path: Path) -> None:
    root = copy_root(small_pcam, tmp_path / "pcam")
    with h5py.File(root / file_name("valid", "y"), "w") as f:
        f.create_dataset("y", data=np.zeros((100, 1, 1, 1), dtype=np.uint8))
    with pytest.raises(PCamDataError, match="128 images but .* 100 labels"):
        PCamSplit.load(root, "valid")


def test_limit_larger_than_split_warns_and_clamps(small_pcam: Path) -> None:
    with pytest.warns(UserWarning, match="exceeds the valid split's 128"):
        split = PCamSplit.load(small_pcam, "valid", limit=10_000)
    assert len(split) == 128
    assert len(PCamSplit.load(small_pcam, "valid", limit=50)) == 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a limit of exactly the split's size is not "larger"
        assert len(PCamSplit.load(small_pcam, "valid", limit=128)) == 128


@pytest.mark.parametrize("bad", [2, 255])
def test_a_label_other_than_0_or_1_is_named(small_pcam: Path, tmp_path: Path, bad: int) -> None:
    root = copy_root(small_pcam, tmp_path / "pcam")
    labels = np.zeros((128, 1, 1, 1), dtype=np.uint8)
    labels[7] = bad
    with h5py.File(root / file_name("valid", "y"), "w") as f:
        f.create_dataset("y", data=labels)
    with pytest.raises(PCamDataError, match=f"labels must be 0 or 1, found {bad}"):
        PCamSplit.load(root, "valid")


def test_write_synthetic_replaces_atomically(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "s", {"train": 8, "valid": 8, "test": 8}, seed=1)
    write_synthetic(root, {"train": 16, "valid": 8, "test": 8}, seed=1)
    assert len(PCamSplit.load(root, "train")) == 16
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp dirs left behind


def test_synthetic_cli_writes_the_official_layout(tmp_path: Path, capsys) -> None:
    from pcamx.data.synthetic import main

    main(["--root", str(tmp_path / "syn"), "--n-train", "16", "--n-valid", "8", "--n-test", "8", "--seed", "2"])
    assert "not PCam data" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "syn").glob("*.[hc][5s]*")) == sorted(all_file_names())
    assert len(PCamSplit.load(tmp_path / "syn", "train")) == 16 and is_synthetic(tmp_path / "syn")


@pytest.mark.parametrize("in_memory", [True, False])
def test_shuffle_order_depends_on_the_generator_only(small_pcam: Path, monkeypatch, in_memory: bool) -> None:
    """The same generator seed gives the same batches whatever the global RNG did (a resumed run relies on
    it); another generator seed gives another order."""
    monkeypatch.setattr(pcam, "SLAB_ROWS", 48)
    split = PCamSplit.load(small_pcam, "train", in_memory=in_memory)

    def order(generator_seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)  # a global RNG in another state must not matter
        batches = split.batches(40, shuffle=True, generator=torch.Generator().manual_seed(generator_seed))
        return torch.cat([x.flatten(1).sum(1) * 2 + y for x, y in batches])  # one number per sample, in order

    assert torch.equal(order(5, global_seed=1), order(5, global_seed=2))
    assert not torch.equal(order(5, global_seed=1), order(6, global_seed=1))


def test_slides_come_from_the_metadata_csv_and_follow_the_limit(small_pcam: Path, tmp_path: Path) -> None:
    root = copy_root(small_pcam, tmp_path / "pcam")
    meta = root / meta_file_name("test")
    lines = meta.read_text().splitlines()
    # Hand-written slide ids, so the test does not depend on how the generator names them.
    meta.write_text("\n".join([lines[0]] + [",".join(line.split(",")[:4] + [f"slide{i % 3}"])
                                            for i, line in enumerate(lines[1:])]) + "\n")
    assert PCamSplit.load(root, "test", limit=5).slides.tolist() == ["slide0", "slide1", "slide2", "slide0", "slide1"]
    meta.unlink()
    assert PCamSplit.load(root, "test").slides is None  # no metadata: patch resampling


def test_a_metadata_csv_without_slides_or_too_short_is_named(small_pcam: Path, tmp_path: Path) -> None:
    root = copy_root(small_pcam, tmp_path / "pcam")
    meta = root / meta_file_name("test")
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(PCamDataError, match=f"{meta.name} has 2 rows"):
        _ = PCamSplit.load(root, "test").slides
    meta.write_text("a,b\n1,2\n")
    with pytest.raises(PCamDataError, match="no 'wsi' column"):
        _ = PCamSplit.load(root, "test").slides


def test_streaming_verify_reads_every_image_once_in_slabs(small_pcam: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pcam, "SLAB_ROWS", 48)
    reads: list[tuple[int, int, int]] = []
    original = pcam.SplitFiles.read_images

    def recording(self, start, stop, out=None):
        result = original(self, start, stop, out)
        reads.append((start, stop, len(result)))
        return result

    monkeypatch.setattr(pcam.SplitFiles, "read_images", recording)
    split = PCamSplit.load(small_pcam, "valid", limit=100, in_memory=False, verify=True)
    assert reads == [(0, 48, 48), (48, 96, 48), (96, 100, 4)]  # the limit's 100 rows, each once
    assert split.images is None
