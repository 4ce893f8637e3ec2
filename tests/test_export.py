"""`python -m pcamx.export`: one ONNX graph from uint8 patches to P(tumour), checked against PyTorch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from pcamx import export
from pcamx.checkpoint import CheckpointError, save_checkpoint
from pcamx.compress.chain import compress
from pcamx.compress.heads import attention_blocks
from pcamx.compress.spec import save_compressed
from pcamx.compress.surgery import LowRankLinear
from pcamx.data.synthetic import generate_split
from pcamx.evaluation.evaluate import predict_batch

WHY = "ONNX export needs onnx, onnxscript and onnxruntime: pip install -e '.[export]'"
onnx = pytest.importorskip("onnx", reason=WHY)
pytest.importorskip("onnxscript", reason=WHY)
ort = pytest.importorskip("onnxruntime", reason=WHY)

THRESHOLDS = {"0.5": 0.5, "youden": 0.4375, "val95spec": 0.71875}


def points(resolution: int, views: int) -> dict:
    return {"thresholds": THRESHOLDS, "split": "valid", "n": 128,
            "measured_with": {"resolution": resolution, "tta_views": views, "precision": "fp32", "quant": "none"}}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A training checkpoint of the tiny model, tested at 48 px (a shrinking, antialiased resize) with 8 views."""
    model = tiny_model()
    path = tmp_path_factory.mktemp("tiny") / "best.pt"
    inference = {"resolution": 48, "tta_views": 8, "precision": "fp32", "quant": "none"}
    save_checkpoint({"model": model.state_dict(), "backbone_config": model.config.to_dict(),
                     "model_name": "dinov3_tiny", "method": "fullft", "method_config": {"name": "fullft"},
                     "train_precision": "fp32", "step": 1, "val_metrics": {"auroc": 0.5},
                     "inference": inference, "operating_points": points(48, 8)}, path)
    return path


@pytest.fixture(scope="module")
def compressed_checkpoint(tmp_path_factory) -> Path:
    """Heads + MLP + SVD on the tiny model: layer 0 keeps 1 head, layer 1 both; low-rank linears. Run at
    112 px (an enlarging resize) with 1 view."""
    model = tiny_model(1, num_attention_heads=2)
    with torch.no_grad():  # head 1 of layer 0 holds almost no o_proj energy: only there is it pruned
        attention_blocks(model)[0][1].o_proj.weight[:, 16:] *= 0.05
    compress(model, "all", {"heads": 0.89, "mlp": 0.9, "svd": 0.5})
    heads = [attention.num_heads for _, attention in attention_blocks(model)]
    assert heads == [1, 2] and any(isinstance(m, LowRankLinear) for m in model.modules())
    extra = {"model_name": "dinov3_tiny", "inference": {"resolution": 112, "tta_views": 1},
             "operating_points": points(112, 1)}
    return save_compressed(model, tmp_path_factory.mktemp("run") / "compressed", extra=extra)


@pytest.fixture(scope="module")
def cli_export(tiny_checkpoint: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    rc = export.main([str(tiny_checkpoint), "--format", "onnx", "--out", str(out), "--dynamic-batch",
                      "--check-samples", "3", "--latency-iters", "2"])
    assert rc == 0
    return out, export.summary(json.loads(export.report_path(out).read_text()))


@pytest.mark.parametrize(("resolution", "views"), [(32, 8), (96, 6), (112, 1)])
def test_wrapper_is_predict_batch(resolution: int, views: int) -> None:
    model = tiny_model()
    images = torch.from_numpy(generate_split(3, 0, "test")[0])
    with torch.inference_mode():
        got = export.ExportedClassifier(model, resolution, views)(images)
        truth = predict_batch(model, images, resolution, views)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert (got - truth).abs().max().item() <= 1e-6


def test_cli_export_takes_uint8_patches_and_returns_probabilities(cli_export, tiny_checkpoint: Path) -> None:
    out, text = cli_export
    proto = onnx.load(str(out))
    signature = export.graph_signature(proto)
    (inp,), (outp,) = signature["input"], signature["output"]
    assert inp["dtype"] == "uint8" and inp["shape"][1:] == [96, 96, 3] and isinstance(inp["shape"][0], str)
    assert outp["dtype"] == "float32" and len(outp["shape"]) == 1

    session = export.onnx_session(out)
    images = generate_split(5, 7, "valid")[0]  # a batch size the check did not use
    model = tiny_model()
    with torch.inference_mode():
        truth = predict_batch(model, torch.from_numpy(images), 48, 8).numpy()
    got = session.run(None, {export.INPUT_NAME: images})[0]
    assert got.shape == (5,) and got.dtype == np.float32 and ((got >= 0) & (got <= 1)).all()
    assert np.abs(got - truth).max() <= 1e-4

    record = json.loads(export.report_path(out).read_text())
    assert record["settings"] == {"resolution": 48, "tta_views": 8, "precision": "fp32", "batch": "dynamic",
                                  "opset": export.OPSET,
                                  "checkpoint_settings": {"resolution": 48, "tta_views": 8, "precision": "fp32",
                                                          "quant": "none", "mpp": None}}
    assert set(record["parity"]["per_input"]) == {"random@batch1", "random@batch3", "synthetic@batch1",
                                                  "synthetic@batch3"}
    assert record["parity"]["max_abs_diff"] <= 1e-4
    lat = record["latency"]
    assert lat["batch"] == 1 and lat["onnxruntime_cpu_ms"] > 0 and lat["pytorch_cpu_ms"] > 0
    assert "onnxruntime" in text and "PyTorch" in text and "max |Δp|" in text


def test_metadata_records_settings_and_thresholds(cli_export, tiny_checkpoint: Path) -> None:
    meta = {p.key: p.value for p in onnx.load(str(cli_export[0])).metadata_props}
    assert json.loads(meta["pcamx.thresholds"]) == THRESHOLDS
    assert meta["pcamx.resolution"] == "48" and meta["pcamx.tta_views"] == "8"
    assert meta["pcamx.source"] == str(tiny_checkpoint) and meta["pcamx.version"]
    assert "uint8" in meta["pcamx.input"] and "P(tumour)" in meta["pcamx.output"]


def test_compressed_model_exports_with_its_shapes(compressed_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "compressed.onnx"
    record = export.export_onnx(compressed_checkpoint.parent, out, tta_views=8, batch=2, check_samples=3,
                                latency_iters=1)
    assert record["settings"]["resolution"] == 112 and record["settings"]["tta_views"] == 8
    assert record["signature"]["input"][0]["shape"] == [2, 96, 96, 3]
    assert record["parity"]["samples"] == {"random": 3, "synthetic": 3}  # the last batch of 2 padded
    assert record["parity"]["max_abs_diff"] <= 1e-4
    assert record["checkpoint"]["kind"] == "compressed"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["pcamx.thresholds"]) == THRESHOLDS


@pytest.fixture
def bare_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint that records no inference settings, with no resolved_config.yaml beside it."""
    model = tiny_model()
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"model": model.state_dict(), "backbone_config": model.config.to_dict()}, path)
    return path


def test_parity_gate_refuses_and_writes_nothing(bare_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(CheckpointError, match="--resolution, --tta-views"):  # the settings must come from somewhere
        export.export_onnx(bare_checkpoint, tmp_path / "x.onnx", tta_views=1)
    real = export.predict_batch
    monkeypatch.setattr(export, "predict_batch", lambda *a, **k: real(*a, **k) + 1e-3)
    out = tmp_path / "out" / "bad.onnx"
    out.parent.mkdir()
    with pytest.raises(export.ExportError, match=r"max \|Δp\| = 0\.001.* nothing was written"):
        export.export_onnx(bare_checkpoint, out, tta_views=1, resolution=32, check_samples=2, latency_iters=1)
    assert list(out.parent.iterdir()) == []


def test_missing_dependency_says_how_to_install(tiny_checkpoint: Path, tmp_path: Path, monkeypatch,
                                                capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    assert export.main([str(tiny_checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "pip install -e '.[export]'" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_clear(tmp_path: Path, capsys) -> None:
    assert export.main([str(tmp_path / "nope"), "--format", "onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main([str(tmp_path), "--format", "tflite"])
    err = capsys.readouterr().err
    assert "invalid choice: 'tflite'" in err and "onnx" in err
    with pytest.raises(SystemExit) as help_exit:
        export.main(["--help"])
    assert help_exit.value.code == 0
    text = capsys.readouterr().out
    for option in ("--format", "--out", "--dynamic-batch", "--batch", "--tta-views", "--resolution", "--check-h5",
                   "--tolerance", "--latency-iters", "--threads", "uint8"):
        assert option in text


def test_an_unwritable_out_is_refused_before_exporting(tiny_checkpoint: Path, tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "to_onnx", lambda *a, **k: pytest.fail("exported before checking --out"))
    out = tmp_path / "missing" / "model.onnx"
    assert export.main([str(tiny_checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out}: the directory {out.parent} does not exist" in err[0]


def test_check_h5_reads_pcam_layout_and_names_a_bad_file(tmp_path: Path) -> None:
    import h5py

    from pcamx.export import read_h5_patches

    patches = np.arange(5 * 96 * 96 * 3, dtype=np.uint8).reshape(5, 96, 96, 3)
    with h5py.File(tmp_path / "t_x.h5", "w") as f:
        f.create_dataset("x", data=patches)
    np.testing.assert_array_equal(read_h5_patches(tmp_path / "t_x.h5", 3), patches[:3])
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("x", data=np.zeros((2, 96, 96), np.uint8))
    with pytest.raises(ValueError, match=r"bad\.h5.*\(N, H, W, 3\) uint8"):
        read_h5_patches(tmp_path / "bad.h5", 2)
    np.save(tmp_path / "a.npy", patches)
    with pytest.raises(ValueError, match="give a PCam \\*_x.h5 file"):
        read_h5_patches(tmp_path / "a.npy", 2)
