"""End to end: `run.py` composes, trains, evaluates with TTA and writes every promised file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import compose_config, fast_overrides, read_predictions
from pcamx import pipeline
from pcamx.data.pcam import PCamSplit
from pcamx.data.synthetic import PATCHES_PER_SLIDE
from pcamx.evaluation.evaluate import predict
from pcamx.evaluation.metrics import binary_metrics
from pcamx.evaluation.uncertainty import apply_temperature, fit_temperature
from pcamx.model import PCamClassifier, build_model

METRIC_KEYS = {"auroc", "auprc", "sens_at_95spec", "ece", "brier", "acc", "nll"}
RUN_FILES = {"metrics.json", "predictions.csv", "roc.png", "calibration.png", "best.pt", "last.pt",
             "resolved_config.yaml"}


@pytest.mark.parametrize("method", ["head_only", "lora", "fullft"])
def test_each_method_runs_end_to_end(small_pcam: Path, tmp_path: Path, method: str) -> None:
    cfg = compose_config(*fast_overrides(small_pcam, f"method={method}"))
    metrics = pipeline.run(cfg, run_dir=tmp_path)
    assert RUN_FILES <= {p.name for p in tmp_path.iterdir()}
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["method"] == method
    assert METRIC_KEYS | {"params", "gflops", "memory_mb", "n_test", "tta", "data", "val"} <= set(on_disk)
    assert on_disk["data"] == "synthetic"  # the generated stand-in is never reported as PCam
    assert on_disk["n_test"] == 128 and on_disk["tta"] is True
    assert METRIC_KEYS <= set(on_disk["val"])
    labels, probs = read_predictions(tmp_path / "predictions.csv")
    recomputed = binary_metrics(labels, probs)
    for key in METRIC_KEYS:
        assert on_disk[key] == pytest.approx(recomputed[key], abs=1e-6), key
    assert metrics["auroc"] == on_disk["auroc"]


def test_best_checkpoint_reproduces_the_test_predictions(small_pcam: Path, tmp_path: Path) -> None:
    cfg = compose_config(*fast_overrides(small_pcam, "method=lora", "eval.tta=false"))
    pipeline.run(cfg, run_dir=tmp_path)
    ckpt = torch.load(tmp_path / "best.pt", weights_only=False)
    assert ckpt["method"] == "lora" and not any("lora_" in k for k in ckpt["model"])
    model: PCamClassifier = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    test = PCamSplit.load(small_pcam, "test", limit=cfg.data.limit_test)
    _, probs = predict(model, test, torch.device("cpu"), 64, cfg.data.resolution, views=1)
    np.testing.assert_allclose(probs, read_predictions(tmp_path / "predictions.csv")[1], atol=1e-6)


def test_real_vits16_loading_path_reports_its_size(small_pcam: Path, tmp_path: Path) -> None:
    from transformers import DINOv3ViTModel

    from pcamx.model import architecture

    weights = tmp_path / "dinov3-vits16"
    DINOv3ViTModel(architecture("vits16")).save_pretrained(weights)
    cfg = compose_config(*fast_overrides(
        small_pcam, "model=dinov3_vits16", f"model.name_or_path={weights}", "train.max_train_batches=1",
        "data.limit_test=16",
    ))
    metrics = pipeline.run(cfg, run_dir=tmp_path / "run")
    assert round(metrics["params"] / 1e6, 2) == 21.60


@pytest.mark.parametrize("select", ["sens95", "val_loss", "ece"])
def test_every_select_metric_picks_a_checkpoint(small_pcam: Path, tmp_path: Path, select: str) -> None:
    cfg = compose_config(*fast_overrides(small_pcam, f"train.select_metric={select}", "train.val_every=0.5"))
    metrics = pipeline.run(cfg, run_dir=tmp_path)
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["step"] == metrics["best_step"] and ckpt["val_metrics"] == metrics["val"]


def test_failed_run_still_writes_metrics_json(tmp_path: Path) -> None:
    cfg = compose_config(*fast_overrides(tmp_path / "no-data"))
    with pytest.raises(Exception, match="missing PCam file"):
        pipeline.run(cfg, run_dir=tmp_path / "run")
    failed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "pcamx.data.download" in failed["error"]


@pytest.mark.slow
def test_demo_writes_every_file_and_names_its_data(demo_run: Path) -> None:
    assert RUN_FILES <= {p.name for p in demo_run.iterdir()}
    assert (demo_run / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["data"] == "synthetic" and metrics["model"] == "dinov3_tiny"
    assert (demo_run / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_metrics_carry_slide_bootstrap_intervals(demo_run: Path, capsys) -> None:
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["ci_method"] == "slide" and metrics["bootstrap"] == 1000
    # The synthetic test split's metadata CSV puts consecutive runs of patches on one stand-in slide.
    assert metrics["ci_slides"] == -(-metrics["n_test"] // PATCHES_PER_SLIDE)
    assert set(metrics["ci95"]) == METRIC_KEYS
    for key in METRIC_KEYS:
        lo, hi = metrics["ci95"][key]
        assert lo <= metrics[key] <= hi, key
    # The printed table shows each interval as it is in metrics.json.
    table = pipeline.format_table(metrics)
    assert f"[{metrics['ci95']['auroc'][0]:.4f}, {metrics['ci95']['auroc'][1]:.4f}]" in table
    assert f"95% interval ({metrics['ci_slides']} slides resampled)" in table


def test_temperature_is_fitted_on_validation_and_reported_before_and_after(small_pcam: Path, tmp_path: Path) -> None:
    cfg = compose_config(*fast_overrides(small_pcam, "eval.calibrate=temperature", "eval.bootstrap=50"))
    metrics = pipeline.run(cfg, run_dir=tmp_path)
    calibration = metrics["calibration"]
    assert calibration["fitted_on"] == "valid" and calibration["n_fit"] == cfg.data.limit_val
    model = torch.load(tmp_path / "best.pt", weights_only=False)
    net: PCamClassifier = build_model(cfg.model)
    net.load_state_dict(model["model"])
    valid = PCamSplit.load(small_pcam, "valid", limit=cfg.data.limit_val)
    val_labels, val_probs = predict(net, valid, torch.device("cpu"), 64, cfg.data.resolution,
                                    views=cfg.eval.tta_views)
    # The same temperature from the validation predictions, independently of the run: never the test split.
    assert calibration["temperature"] == pytest.approx(fit_temperature(val_labels, val_probs), rel=1e-4)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["prob"]) for r in rows])
    calibrated = np.array([float(r["prob_calibrated"]) for r in rows])
    np.testing.assert_allclose(calibrated, apply_temperature(probs, calibration["temperature"]), atol=2e-6)
    for key in ("ece", "nll", "brier"):
        assert calibration["before"][key] == pytest.approx(metrics[key])
        assert calibration["after"][key] == pytest.approx(binary_metrics(labels, calibrated)[key], abs=1e-5)


@pytest.mark.slow
def test_demo_training_beats_chance_clearly_but_not_perfectly(demo_run: Path) -> None:
    labels, probs = read_predictions(demo_run / "predictions.csv")
    auroc = roc_auc_score(labels, probs)
    assert 0.9 <= auroc < 1.0
    assert json.loads((demo_run / "metrics.json").read_text())["auroc"] == pytest.approx(auroc, abs=1e-9)
