"""Training and evaluation precision: what is asked, what runs, and what every output says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import compose_config, fast_overrides, read_predictions
from pcamx import pipeline
from pcamx.compress.quant import EvalPrecision
from pcamx.runtime.hardware import autocast, resolve_precision
from pcamx.training import loop as train

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


def test_auto_hardware_uses_bf16_only_on_cuda_and_explicit_choices_are_kept() -> None:
    assert resolve_precision("bf16", "train.precision", CPU, "auto") == "fp32"
    assert resolve_precision("bf16", "train.precision", CUDA, "auto") == "bf16"
    assert resolve_precision("bf16", "eval.precision", CPU, "cpu") == "bf16"  # asked for: CPU autocast
    assert resolve_precision("fp32", "eval.precision", CUDA, "a100") == "fp32"
    with pytest.raises(ValueError, match="eval.precision=bf16: bf16 autocast runs on cuda or cpu, not mps"):
        resolve_precision("bf16", "eval.precision", MPS, "mps")
    with pytest.raises(ValueError, match="train.precision must be one of fp32, bf16, got 'bf61'"):
        resolve_precision("bf61", "train.precision", CPU, "cpu")


def test_bf16_autocast_really_runs_in_bf16_on_the_cpu() -> None:
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast(CPU, "bf16"):
        assert linear(x).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert linear(x).dtype == torch.float32


def test_eval_precision_labels() -> None:
    assert EvalPrecision.of("none", CPU, "fp32") == "fp32"
    assert EvalPrecision.of("none", CUDA, "bf16") == "bf16-autocast"
    assert EvalPrecision.of("bf16", CPU, "bf16") == "bf16"  # quantized: its own dtype
    assert EvalPrecision.of("int8", CPU) == "int8-dynamic"
    assert EvalPrecision.of("int8", CUDA) == "int8-weight-only"
    # Each label says the mode it comes from, and the table shows it as the reference does.
    assert [(p.quant, p.label) for p in EvalPrecision] == [
        ("none", "none (f32)"), ("none", "none (bf16 autocast)"), ("bf16", "bf16"), ("int8", "int8 (weight-only)"),
        ("int8", "int8 (dynamic)")]


@pytest.fixture(scope="module")
def trained(small_pcam: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("precision") / "trained"
    pipeline.run(compose_config(*fast_overrides(small_pcam)), run_dir=run_dir)
    return run_dir


def test_every_run_states_its_precisions_and_auto_on_a_cpu_is_fp32(trained: Path, small_pcam: Path,
                                                                    tmp_path: Path) -> None:
    m = json.loads((trained / "metrics.json").read_text())
    assert (m["train_precision"], m["eval_precision"], m["tta_views"], m["resolution"]) == ("fp32", "fp32", 8, 32)
    if torch.cuda.is_available():
        pytest.skip("hardware=auto picks CUDA here")
    cfg = compose_config(*fast_overrides(small_pcam, "hardware=auto",
                                         "train.max_train_batches=1"))
    assert cfg.train.precision == "bf16"  # hardware=auto's default ...
    auto = pipeline.run(cfg, run_dir=tmp_path)
    assert auto["train_precision"] == "fp32"  # ... which is fp32 without CUDA, and says so
    resolved = OmegaConf.load(tmp_path / "resolved_config.yaml")
    assert (resolved.train.precision, resolved.hardware.precision) == ("fp32", "bf16")


def test_bf16_evaluation_of_an_unquantized_model_is_autocast_and_labelled(trained: Path, small_pcam: Path,
                                                                         tmp_path: Path) -> None:
    cfg = compose_config(*fast_overrides(small_pcam, f"checkpoint={trained}", "eval.precision=bf16"))
    m = pipeline.run(cfg, run_dir=tmp_path)
    assert m["eval_precision"] == "bf16-autocast" and m["quant"] == "none"
    f32 = read_predictions(trained / "predictions.csv")[1]
    bf16 = read_predictions(tmp_path / "predictions.csv")[1]
    assert not np.array_equal(f32, bf16)  # really evaluated differently ...
    np.testing.assert_allclose(bf16, f32, atol=0.05)  # ... and close
    assert m["train_precision"] == "fp32"  # the checkpoint's training precision travels with it


def test_select_tiebreak_picks_the_tied_checkpoint_with_lower_nll(small_pcam: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([{"auroc": 0.9, "nll": 0.5}, {"auroc": 0.9, "nll": 0.4}, {"auroc": 0.9, "nll": 0.45},
                     {"auroc": 0.8, "nll": 0.1}] * 2)
    monkeypatch.setattr(train, "validate", lambda *args: dict(next(scripted)))
    overrides = ("train.val_every=0.25",)  # 4 steps, a validation after each
    plain = pipeline.run(compose_config(*fast_overrides(small_pcam, *overrides)), run_dir=tmp_path / "a")
    tiebreak = pipeline.run(compose_config(*fast_overrides(small_pcam, *overrides, "train.select_tiebreak=nll")),
                            run_dir=tmp_path / "b")
    assert plain["best_step"] == 1 and tiebreak["best_step"] == 2


def test_bad_precision_and_tiebreak_fail_at_composition_with_the_allowed_values() -> None:
    for override, allowed in (("eval.precision=fp16", "[fp32, bf16]"), ("hardware.precision=bf61", "[fp32, bf16]"),
                              ("train.select_tiebreak=bogus", "[auroc, auprc, sens_at_95spec")):
        with pytest.raises(ConfigCompositionException) as err:
            compose_config(override)
        assert f"expected one of {allowed}" in str(err.value.__cause__), override


def test_bad_views_and_jitter_fail_before_any_data_is_read(tmp_path: Path) -> None:
    for override, match in (("eval.tta_views=4", "eval.tta_views=4 is out of range: it must be one of 1, 6, 8"),
                            ("data.jitter.hue=0.7", "data.jitter.hue")):
        with pytest.raises(ValueError, match=match):
            pipeline.run(compose_config(*fast_overrides(tmp_path / "no-data", override)), run_dir=tmp_path / "r")
