"""Smoke test of `python -m benchmarks`: one step per figure on CPU with the tiny model at 32 px.

Only the shape of bench.json is checked; timings on a shared CI machine mean nothing."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import main
from benchmarks.sections import SECTIONS, budget_variants
from pcamx.training.methods import METHODS

pytestmark = pytest.mark.slow
CONDITIONS = ("device", "threads", "torch", "batch_size", "resolution")


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _check_figure(fig: dict, batch_size: int) -> None:
    assert _positive(fig["images_per_s"]), fig
    for key in CONDITIONS:
        assert key in fig, (key, fig)
    assert fig["device"] == "cpu" and fig["resolution"] == 32 and fig["batch_size"] == batch_size
    assert fig["timed_iters"] == [1] and fig["repeats"] == 1 and fig["warmup_iters"] >= 1


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--device", "cpu", "--model", "tiny", "--resolution", "32", "--batch-size", "4",
            "--eval-batch-size", "4", "--workers", "1", "--threads", "1", "--quick", "--out", str(out)]
    code = main(argv)
    doc = json.loads(out.read_text())
    assert code == 0, {k: v.get("error") for k, v in doc["sections"].items()}
    return doc


def test_every_section_present(bench):
    sections = bench["sections"]
    assert set(sections) == set(SECTIONS)
    for name, section in sections.items():
        assert "error" not in section, (name, section.get("traceback"))
    assert sections["mfu"] == {"skipped": "no CUDA", "section_s": sections["mfu"]["section_s"]}
    assert bench["meta"]["device"] == "cpu" and bench["meta"]["torch"]
    assert bench["settings"]["quick"] and bench["settings"]["resolution"] == 32


def test_pipeline_and_eval_figures(bench):
    pipeline = bench["sections"]["pipeline"]
    for mode in ("train", "eval"):
        for side in ("pcamx", "reference"):
            _check_figure(pipeline[mode][side], 4)
        assert _positive(pipeline[mode]["ratio"])
    for side in ("pcamx", "reference", "reference_1core"):
        _check_figure(pipeline["host"][side], 4)
    assert _positive(pipeline["host"]["ratio"]) and _positive(pipeline["host"]["reference_us_per_image_1core"])

    ev = bench["sections"]["eval"]
    _check_figure(ev["pcamx"], 4)
    _check_figure(ev["reference"]["8"], 4)
    # Identical views through both pipelines: the probabilities must agree.
    assert ev["equivalence"]["passed"], ev["equivalence"]
    assert ev["equivalence"]["prob_max"] - ev["equivalence"]["prob_min"] > 1e-3  # not all 0.5


def test_train_figures(bench):
    train = bench["sections"]["train"]
    for method in METHODS:
        entry = train[method]
        _check_figure(entry["pcamx_eager"], 4)
        _check_figure(entry["reference"], 4)
        assert entry["pcamx_compiled"]["skipped"]  # --quick skips compilation, with a reason
        assert entry["pcamx_eager"]["trainable_params"] > 0
        assert entry["pcamx_eager"]["peak_memory_bytes"] is None  # measured on CUDA only
    assert train["head_only"]["pcamx_eager"]["trainable_params"] < train["fullft"]["pcamx_eager"]["trainable_params"]


def test_compress_and_load(bench):
    variants = bench["sections"]["compress"]["variants"]
    assert {"uncompressed", "heads", "mlp", "svd", "all", "bf16", "int8"} <= set(variants)
    for name, fig in variants.items():
        if "skipped" in fig:
            assert name in ("bf16", "int8")
            continue
        assert _positive(fig["latency_ms"]) and _positive(fig["images_per_s"]) and fig["params"] > 0
        assert fig["latency"]["batch_size"] == 1 and fig["throughput"]["batch_size"] == 4
        assert fig["latency_ms"] == pytest.approx(1e3 / fig["latency"]["images_per_s"])
    assert variants["all"]["params"] <= variants["uncompressed"]["params"]
    for fig in (f for f in variants.values() if "latency_ms" in f):
        assert fig["speedup_latency"] == pytest.approx(variants["uncompressed"]["latency_ms"] / fig["latency_ms"])
        assert fig["speedup_throughput"] == pytest.approx(fig["images_per_s"]
                                                          / variants["uncompressed"]["images_per_s"])

    # Budgets (--quick: the first ratio only) and block removal: each within its GFLOPs, with the τ found.
    budgets = dict(budget_variants(quick=True))
    assert {n for n, _ in budget_variants(quick=False)} > set(budgets) and len(budgets) == 3
    for name, spec in budgets.items():
        fig = variants[name]
        assert fig["budget"] == {"target_ratio": spec["target_ratio"]}
        assert fig["gflops_ratio"] == pytest.approx(fig["achieved"]["gflops_ratio"], abs=1e-6)
        assert fig["gflops"] <= fig["limit"]["gflops"] and fig["gflops_ratio"] <= spec["target_ratio"]
        assert fig["params"] < variants["uncompressed"]["params"] and fig["search_trials"] >= 2
        assert _positive(fig["compress_s"]) and fig["search_s"] == fig["compress_s"]
        (tau,) = set(fig["taus"]["tau"].values())
        assert 0 < tau < 1 and fig["prune"]["steps"] == (["blocks"] if spec["method"] == "blocks"
                                                         else ["heads", "mlp", "svd"])
        assert fig["prune"]["criterion"] == spec.get("criterion", "weight")
    assert bench["sections"]["compress"]["calibration"]["batches"] >= 1
    assert bench["sections"]["compress"]["budget_note"]  # says what --quick left out

    load = bench["sections"]["load"]
    assert load["images"] == 512 and load["bytes"] >= 512 * 96 * 96 * 3
    assert _positive(load["load_s"]) and _positive(load["per_sample_read_us"])


def test_predict_folder(bench):
    """`python -m pcamx.predict CHECKPOINT FOLDER` against the per-file PIL + processor loop, 1 and 8 views."""
    predict = bench["sections"]["predict"]
    assert set(predict["views"]) == {"1", "8"}
    for views, entry in predict["views"].items():
        _check_figure(entry["pcamx"], 64)  # pcamx.predict's default batch
        _check_figure(entry["reference"], 1)  # one file at a time
        for side in ("pcamx", "reference"):
            assert entry[side]["views"] == int(views) and entry[side]["images"] == entry["images"] == 8
        assert entry["settings"] == {"resolution": 32, "tta_views": int(views), "precision": "fp32", "quant": "none"}
        assert entry["ratio"] == pytest.approx(entry["pcamx"]["images_per_s"] / entry["reference"]["images_per_s"])
        assert entry["png_bytes"] > 0 and _positive(entry["load_s"])
        # The same PNGs through both ways: the probabilities agree, and they are spread out (not saturated).
        eq = entry["equivalence"]
        assert eq["passed"] and eq["max_abs_diff"] <= eq["atol"] == 1e-4, eq
        assert eq["prob_max"] - eq["prob_min"] > 0.05 and 0 < eq["prob_min"] and eq["prob_max"] < 1, eq


def test_export_latency(bench):
    export = bench["sections"]["export"]
    if "skipped" in export:  # onnxruntime / onnx / onnxscript not installed: a reason, not a failure
        assert "pip install" in export["skipped"]
        return
    assert set(export["variants"]) == {"uncompressed", "all"} and export["views"] == [1, 8]
    assert export["variants"]["all"]["params"] <= export["variants"]["uncompressed"]["params"]
    for entry in export["variants"].values():
        for views in ("1", "8"):
            fig = entry[views]
            assert fig["batch"] == 1 and fig["tta_views"] == int(views) and fig["resolution"] == 32
            assert fig["threads"] == 1 and fig["iters"] >= 1
            assert _positive(fig["onnxruntime_cpu_ms"]) and _positive(fig["pytorch_cpu_ms"])
            assert fig["speedup"] == pytest.approx(fig["pytorch_cpu_ms"] / fig["onnxruntime_cpu_ms"])
            assert fig["max_abs_diff"] <= 1e-4 and _positive(fig["export_s"])


def test_new_sections_rendered(bench):
    from benchmarks.report import render_markdown

    text = render_markdown(bench)
    assert "### pcamx.predict on a folder of PNG patches" in text and "Same probabilities: 1 view(s)" in text
    assert "### ONNX Runtime vs PyTorch, CPU latency" in text


def test_targets_reported(bench):
    names = {t["name"]: t for t in bench["targets"]}
    assert set(names) == {"host_side", "cpu_end_to_end", "gpu_eval_tta", "gpu_training", "pipeline_vs_training",
                          "host_vs_training", "gpu_training_mfu", "uncertainty_budget"}
    train = bench["sections"]["train"]
    fastest = max(train[m][k]["images_per_s"] for m in ("head_only", "lora", "fullft")
                  for k in ("pcamx_eager", "pcamx_compiled") if "images_per_s" in train[m][k])
    host = bench["sections"]["pipeline"]["host"]["pcamx"]["images_per_s"]
    assert names["host_vs_training"]["value"] == pytest.approx(host / fastest)
    assert names["gpu_training_mfu"]["status"].startswith("n/a")
    for target in names.values():
        assert target["status"] in ("met", "not met") or target["status"].startswith("n/a")
    assert names["gpu_eval_tta"]["status"].startswith("n/a")  # CPU run
    assert names["host_side"]["value"] is not None
    unc = bench["sections"]["uncertainty"]  # the budget over the seconds of the heaviest case, one thread
    assert unc["threads"] == 1 and unc["draws"] > 0
    assert names["uncertainty_budget"]["value"] == pytest.approx(unc["budget_s"] / unc["paired_slide_s"])
