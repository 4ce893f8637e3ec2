"""Compression inside a run: early validation, reloadable compressed checkpoints, healing, reporting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

from conftest import compose_config, fast_overrides, prune_plan, read_predictions
from pcamx import pipeline
from pcamx.checkpoint import CheckpointError
from pcamx.evaluation.metrics import METRIC_NAMES


@pytest.mark.parametrize("override", ["prune.tau=1.5", "prune.tau=0", "prune.tau={heads:0.9,mlp:-0.2,svd:0.9}"])
def test_bad_tau_is_rejected_before_anything_runs(tmp_path: Path, override: str) -> None:
    # The data root does not exist: the τ error must come first, before any data is read.
    cfg = compose_config(*fast_overrides(tmp_path / "no-data", "prune=all", override))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        pipeline.run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "best.pt").exists()


def test_unknown_prune_method_errors() -> None:
    with pytest.raises(ConfigCompositionException, match="prune"):
        compose_config("prune=lottery")
    with pytest.raises(ConfigCompositionException) as err:  # the schema names the allowed values
        compose_config("prune.method=lottery")
    assert "expected one of [none, heads, mlp, svd, blocks, all]" in str(err.value.__cause__)
    with pytest.raises(ValueError, match="heads, mlp, svd, blocks, all"):  # the library checks too
        prune_plan("lottery", 0.9)


@pytest.fixture(scope="module")
def compressed_run(small_pcam: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("compressed") / "run"
    cfg = compose_config(*fast_overrides(small_pcam, "method=lora", "prune=all", "prune.tau=0.9", "eval.tta=false",
                                         "eval.measure_speed=true", "eval.bootstrap=200"))
    pipeline.run(cfg, run_dir=run_dir)
    return run_dir


def test_compressed_run_reports_reference_and_changes(compressed_run: Path) -> None:
    m = json.loads((compressed_run / "metrics.json").read_text())
    assert m["prune"]["method"] == "all" and m["prune"]["tau"] == {"heads": 0.9, "mlp": 0.9, "svd": 0.9}
    assert set(m["compression"]) == {"heads", "mlp", "svd"}
    ref = m["reference"]
    assert m["params"] < ref["params"] and m["gflops"] <= ref["gflops"]
    assert ref["change_pct"]["params"] == pytest.approx(100 * (m["params"] - ref["params"]) / ref["params"], abs=1e-3)
    for key in ("latency_ms_b1", "throughput_ips", "auroc"):
        assert key in m and key in ref
    assert (compressed_run / "compressed" / "architecture.json").is_file()


def test_compressed_run_is_compared_with_its_reference_on_the_same_patches(compressed_run: Path) -> None:
    m = json.loads((compressed_run / "metrics.json").read_text())
    paired = m["reference"]["paired"]
    assert set(paired) == set(METRIC_NAMES) and 0 <= paired["auroc"]["p_delong"] <= 1
    for key in METRIC_NAMES:
        assert paired[key]["diff"] == pytest.approx(m[key] - m["reference"][key], abs=1e-12), key
        lo, hi = paired[key]["ci95"]
        assert lo <= paired[key]["diff"] <= hi, key
    assert set(m["ci95"]) == set(METRIC_NAMES) and m["ci_method"] == "slide"


def test_checkpoint_rebuilds_compressed_model_exactly(compressed_run: Path, small_pcam: Path, tmp_path: Path) -> None:
    cfg = compose_config(*fast_overrides(small_pcam, f"checkpoint={compressed_run}", "eval.tta=false"))
    reloaded = pipeline.run(cfg, run_dir=tmp_path)
    original = json.loads((compressed_run / "metrics.json").read_text())
    assert reloaded["params"] == original["params"]
    assert reloaded["checkpoint"]["kind"] == "compressed" and reloaded["train_steps"] == 0
    assert "compression" not in reloaded  # rebuilt from the spec, not pruned again
    np.testing.assert_allclose(read_predictions(tmp_path / "predictions.csv")[1],
                               read_predictions(compressed_run / "predictions.csv")[1], atol=1e-6)


def test_checkpoint_errors_are_clear(compressed_run: Path, small_pcam: Path, tmp_path: Path) -> None:
    cfg = compose_config(*fast_overrides(small_pcam, f"checkpoint={tmp_path / 'nope'}"))
    with pytest.raises(CheckpointError, match="does not exist"):
        pipeline.run(cfg, run_dir=tmp_path / "a")
    (tmp_path / "empty").mkdir()
    cfg = compose_config(*fast_overrides(small_pcam, f"checkpoint={tmp_path / 'empty'}"))
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        pipeline.run(cfg, run_dir=tmp_path / "b")
    for ckpt in (compressed_run, compressed_run / "best.pt"):
        cfg = compose_config(*fast_overrides(small_pcam, f"checkpoint={ckpt}", "model=dinov3_vits16"))
        with pytest.raises(CheckpointError, match="model=dinov3_tiny checkpoint .* model=dinov3_vits16"):
            pipeline.run(cfg, run_dir=tmp_path / "c")


def test_healing_a_checkpoint_needs_its_training_method(compressed_run: Path, small_pcam: Path,
                                                        tmp_path: Path) -> None:
    cfg = compose_config(*fast_overrides(small_pcam, f"checkpoint={compressed_run / 'best.pt'}", "prune=mlp",
                                         "prune.heal_epochs=1", "method=fullft"))
    with pytest.raises(ValueError, match="trained with method=lora.*add method=lora"):
        pipeline.run(cfg, run_dir=tmp_path)


@pytest.mark.slow
def test_healing_lowers_distillation_loss_and_keeps_val_auroc(demo_run: Path, tmp_path: Path) -> None:
    cfg = compose_config("experiment=demo", f"data.root={demo_run.parent / 'synthetic'}",
                         f"checkpoint={demo_run / 'best.pt'}", "prune=all", "prune.tau=0.5",
                         "prune.heal_epochs=1", "eval.measure_speed=false")
    m = pipeline.run(cfg, run_dir=tmp_path)
    assert m["heal"]["best_step"] > 0  # a healed state won on val, not the unhealed starting point
    assert m["heal"]["val_kd"] < m["before_heal"]["val_kd"]  # closer to the uncompressed teacher
    assert all("kd_loss" in record for record in m["heal"]["history"])
    assert m["heal"]["val"]["auroc"] >= m["before_heal"]["val"]["auroc"]
    assert {"auroc", "val"} <= set(m["before_heal"])


def test_lora_heals_a_factorized_model(small_pcam: Path, tmp_path: Path) -> None:
    # After truncated SVD the targets are LowRankLinear pairs: LoRA adapts both halves.
    cfg = compose_config(*fast_overrides(small_pcam, "method=lora", "prune=svd", "prune.tau=0.5",
                                         "prune.heal_epochs=1"))
    m = pipeline.run(cfg, run_dir=tmp_path)
    assert any(row["replaced"] for row in m["compression"]["svd"])
    assert m["heal"]["history"] and m["status"] == "ok"


def test_a_budget_run_with_data_aware_importance_whole_blocks_and_healing(small_pcam: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "budget"
    cfg = compose_config(*fast_overrides(
        small_pcam, "method=fullft", "prune=all", "prune.order=[blocks,heads,mlp,svd]", "prune.target_ratio=0.8",
        "prune.criterion=taylor", "prune.scope=global", "prune.calib_batches=1", "prune.heal_epochs=1",
        "eval.tta=false"))
    m = pipeline.run(cfg, run_dir=run_dir)
    p = m["prune"]
    assert (p["budget"], p["criterion"], p["scope"], p["steps"]) == (
        {"target_ratio": 0.8}, "taylor", "global", ["blocks", "heads", "mlp", "svd"])
    assert p["achieved"]["gflops"] <= 0.8 * m["reference"]["gflops"] + 1e-4
    assert m["gflops"] == pytest.approx(p["achieved"]["gflops"], abs=1e-4)  # the table's number is the budget's
    assert len(set(p["tau"].values())) == 1 and 0 < p["tau"]["heads"] < 1
    assert m["heal"]["epochs"] == 1

    cfg = compose_config(*fast_overrides(small_pcam, f"checkpoint={run_dir}", "eval.tta=false"))
    reloaded = pipeline.run(cfg, run_dir=tmp_path / "reloaded")
    assert reloaded["params"] == m["params"]
    np.testing.assert_allclose(read_predictions(tmp_path / "reloaded" / "predictions.csv")[1],
                               read_predictions(run_dir / "predictions.csv")[1], atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["prune=heads", "prune.criterion=activation", "prune.calib_batches=0"], "calib_batches >= 1"),
    (["prune=all", "prune.target_ratio=0.5", "prune.target_gflops=1"], "give one budget"),
])
def test_bad_compression_settings_fail_before_anything_runs(tmp_path: Path, overrides: list[str], message: str) -> None:
    cfg = compose_config(*fast_overrides(tmp_path / "no-data", *overrides))
    with pytest.raises(ValueError, match=message):
        pipeline.run(cfg, run_dir=tmp_path / "run")
