"""Smoke test of `python -m benchmarks`: one call per figure on CPU with the tiny model at 32 px.

The shape of bench.json, the conditions every figure carries, the equivalence check and the targets' logic are
checked; timings on a shared CI machine mean nothing."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import main
from benchmarks.report import render_markdown
from benchmarks.sections import BUDGETS, SECTIONS
from pcamx.config import compose
from pcamx.training.methods import METHODS

pytestmark = pytest.mark.slow
CONDITIONS = ("device", "threads", "torch", "batch_size", "resolution", "precision")


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _check_figure(fig: dict, batch_size: int, device: str = "cpu") -> None:
    assert _positive(fig["images_per_s"]), fig
    assert all(key in fig for key in CONDITIONS), fig
    assert fig["device"] == device and fig["resolution"] == 32 and fig["batch_size"] == batch_size
    assert fig["timed_iters"] == [1] and fig["repeats"] == 1 and fig["warmup_iters"] >= 1


def _check_comparison(entry: dict, batch_size: int) -> None:
    _check_figure(entry["pcamx"], batch_size)
    _check_figure(entry["reference"], batch_size)
    assert entry["ratio"] == pytest.approx(entry["pcamx"]["images_per_s"] / entry["reference"]["images_per_s"])


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--device", "cpu", "--model", "tiny", "--resolution", "32", "--batch-size", "4",
            "--eval-batch-size", "4", "--workers", "1", "--threads", "1", "--quick", "--out", str(out)]
    code = main(argv)
    doc = json.loads(out.read_text())
    assert code == 0, {k: v.get("traceback") for k, v in doc["sections"].items()}
    return doc


def test_every_section_present(bench):
    sections = bench["sections"]
    assert set(sections) == set(SECTIONS) == {"pipeline", "eval", "train", "compress", "mfu", "wsi"}
    assert sections["mfu"] == {"skipped": "no CUDA", "section_s": sections["mfu"]["section_s"]}
    assert bench["meta"]["device"] == "cpu" and bench["meta"]["torch"] and bench["meta"]["threads"] == 1
    s = bench["settings"]
    assert s["quick"] and s["resolution"] == 32 and s["device"] == "cpu" and s["precision"] == "fp32"
    # Defaults that come from conf/, not from the benchmark: pcamx's TTA views (the CPU loop runs those only) and
    # the reference protocol's.
    ev = sections["eval"]
    assert s["views"] == ev["views"] == compose().eval.tta_views and ev["loop_views"] == [s["views"]]
    assert ev["protocol_views"] == compose("experiment=repro_compress").eval.tta_views


def test_pipeline_eval_and_train_figures(bench):
    pipeline = bench["sections"]["pipeline"]
    for mode in ("train", "eval"):
        _check_comparison(pipeline[mode], 4)
    _check_figure(pipeline["host"]["pcamx"], 4)
    _check_figure(pipeline["host"]["reference"], 4)
    assert pipeline["host"]["pcamx"]["precision"] == "uint8" and pipeline["host"]["reference"]["workers"] == 1

    ev = bench["sections"]["eval"]
    assert set(ev["comparisons"]) == {"8 views, fp32"}
    _check_comparison(ev["comparisons"]["8 views, fp32"], 4)
    assert ev["comparisons"]["8 views, fp32"]["pcamx"]["forward_batch"] == 32
    # The same patches through both pipelines: the probabilities agree, and they are spread out (not saturated).
    eq = ev["equivalence"]
    assert eq["passed"] and eq["max_abs_diff"] <= eq["atol"] == 1e-4, eq
    assert eq["prob_max"] - eq["prob_min"] > 0.05 and 0 < eq["prob_min"] and eq["prob_max"] < 1, eq

    train = bench["sections"]["train"]
    for method in METHODS:
        _check_comparison(train[method]["eager"], 4)
        assert train[method]["compiled"]["pcamx"] == {"skipped": "--quick"}
        assert train[method]["compiled"]["ratio"] is None
        assert train[method]["eager"]["pcamx"]["peak_memory_bytes"] is None  # measured on CUDA only
    params = {m: train[m]["eager"]["pcamx"]["trainable_params"] for m in METHODS}
    assert 0 < params["head_only"] < params["fullft"]


def test_compress_figures(bench):
    sec = bench["sections"]["compress"]
    variants, first = sec["variants"], sec["variants"]["uncompressed"]
    assert {"uncompressed", "heads", "mlp", "svd", "all", "bf16", "int8"} <= set(variants)
    # The reference τ come from conf/experiment/repro_compress.yaml.
    tau = compose("experiment=repro_compress").prune.tau
    assert variants["all"]["tau"] == {step: tau[step] for step in ("heads", "mlp", "svd")}
    assert variants["heads"]["tau"] == {"heads": tau["heads"]}
    for name, fig in variants.items():
        if "skipped" in fig:
            assert name in ("bf16", "int8"), fig
            continue
        assert _positive(fig["latency_ms"]) and _positive(fig["images_per_s"]) and fig["params"] > 0
        assert fig["latency"]["batch_size"] == 1 and fig["throughput"]["batch_size"] == 4
        assert fig["latency"]["timed_iters"] == fig["throughput"]["timed_iters"] == 1
        assert fig["speedup_latency"] == pytest.approx(first["latency_ms"] / fig["latency_ms"])
        assert fig["speedup_throughput"] == pytest.approx(fig["images_per_s"] / first["images_per_s"])
    assert variants["all"]["params"] <= first["params"]

    # --quick: the 0.75 budgets only; each within its GFLOPs, with the τ found.
    ran = {name for name in BUDGETS if name in variants}
    assert ran == {name for name, keys in BUDGETS.items() if keys["target_ratio"] == 0.75} and len(ran) == 3
    for name in ran:
        fig, keys = variants[name], BUDGETS[name]
        assert fig["prune"]["budget"] == {"target_ratio": keys["target_ratio"]}
        assert fig["gflops_ratio"] == pytest.approx(fig["search"]["achieved"]["gflops_ratio"], abs=1e-6)
        assert fig["gflops"] <= fig["search"]["limit"]["gflops"] and fig["gflops_ratio"] <= keys["target_ratio"]
        assert fig["params"] < first["params"] and fig["search"]["search_trials"] >= 2
        (tau,) = set(fig["tau"].values())
        assert 0 < tau < 1 and fig["prune"]["criterion"] == keys.get("criterion", "weight")
        assert fig["prune"]["steps"] == (["blocks"] if keys["method"] == "blocks" else ["heads", "mlp", "svd"])


def test_targets_reported(bench):
    targets = {t["name"]: t for t in bench["targets"]}
    assert set(targets) == {"host_side", "cpu_end_to_end", "gpu_eval_tta", "gpu_training", "pipeline_vs_training",
                            "host_vs_training", "gpu_training_mfu", "wsi_batched", "wsi_reading", "wsi_peak_rss_gb"}
    # On a CPU run exactly the GPU targets are n/a, saying why (and the memory one on --quick's small slide); every
    # other one has a value and a verdict.
    not_applicable = {name: t["status"] for name, t in targets.items() if t["status"].startswith("n/a")}
    assert not_applicable == dict.fromkeys(("gpu_eval_tta", "gpu_training", "gpu_training_mfu"),
                                           "n/a (GPU target)") | {"wsi_peak_rss_gb": "n/a (--quick slide)"}
    for name, t in targets.items():
        if name not in not_applicable:
            assert _positive(t["value"]), t
            assert t["status"] == ("met" if t["value"] >= t["threshold"] else "not met"), t
    wsi = bench["sections"]["wsi"]
    assert targets["wsi_batched"]["value"] == wsi["views_1"]["ratio"] == pytest.approx(
        wsi["views_1"]["pcamx_tiles_per_s"] / wsi["views_1"]["per_tile"]["tiles_per_s"])
    assert targets["wsi_reading"]["value"] == pytest.approx(
        wsi["reading"]["reading_tiles_per_s"] / wsi["reading"]["model_tiles_per_s"])

    sections = bench["sections"]
    train, pipeline = sections["train"], sections["pipeline"]
    fastest = max(train[m]["eager"]["pcamx"]["images_per_s"] for m in METHODS)
    assert targets["host_vs_training"]["value"] == pytest.approx(pipeline["host"]["pcamx"]["images_per_s"] / fastest)
    assert targets["pipeline_vs_training"]["value"] == pytest.approx(
        pipeline["train"]["pcamx"]["images_per_s"] / fastest)
    assert targets["host_side"]["value"] == pytest.approx(pipeline["host"]["ratio"])
    ratios = [sections["eval"]["comparisons"]["8 views, fp32"]["ratio"], *(train[m]["eager"]["ratio"] for m in METHODS)]
    assert targets["cpu_end_to_end"]["value"] == pytest.approx(min(ratios))


def test_wsi_section(bench):
    """pcamx.wsi beside the per-tile script at 1 view and at the demo model's views, reading beside the model, and
    the peak memory of a run on a bigger slide (its tile counts from pcamx.wsi's own slide.json)."""
    wsi = bench["sections"]["wsi"]
    views = wsi["settings"]["tta_views"]
    assert views == compose("experiment=demo").eval.tta_views and wsi["tissue_tiles"] > 0
    assert {k for k in wsi if k.startswith("views_")} == {"views_1", f"views_{views}"}
    for key in ("views_1", f"views_{views}"):
        assert _positive(wsi[key]["pcamx_tiles_per_s"]) and _positive(wsi[key]["per_tile"]["tiles_per_s"])
    assert wsi["reading"]["views"] == views and _positive(wsi["reading"]["reading_tiles_per_s"])
    big = wsi["big"]
    assert big["size"] == 4096 and 0 < big["peak_rss_gb"] < 24 and big["tiles"]["total"] == (4096 // 96) ** 2
    assert 0 < big["tiles"]["scored"] < big["tiles"]["total"]  # glass around the tissue is not scored


def test_targets_status_rules():
    """The verdicts on made-up sections: a value under its threshold is `not met`, a missing one n/a."""
    from benchmarks.report import evaluate_targets

    fig = {"images_per_s": 10.0}
    sections = {"pipeline": {"host": {"pcamx": {"images_per_s": 50.0}, "ratio": 99.0}, "train": {"pcamx": fig}},
                "train": {m: {"eager": {"pcamx": fig, "ratio": 2.0}} for m in METHODS}}
    targets = {t["name"]: t for t in evaluate_targets(sections, "cpu")}
    assert targets["host_side"]["status"] == "not met" and targets["host_vs_training"]["status"] == "not met"
    assert targets["pipeline_vs_training"]["value"] == 1.0 and targets["pipeline_vs_training"]["status"] == "not met"
    # The eval section is missing: the worst of the others.
    assert targets["cpu_end_to_end"]["value"] == 2.0 and targets["cpu_end_to_end"]["status"] == "met"
    cuda = {t["name"]: t["status"] for t in evaluate_targets(sections, "cuda")}
    assert cuda["cpu_end_to_end"] == "n/a (CPU-device target)" and cuda["gpu_training"] == "not met"
    assert cuda["gpu_eval_tta"] == cuda["gpu_training_mfu"] == "n/a (section not run or failed)"
    # Memory is a ceiling: over it is `not met`, under it `met`; a small (--quick) slide is no measure of it.
    for size, gb, status in ((50_000, 2.5, "not met"), (50_000, 1.9, "met"), (4096, 1.0, "n/a (--quick slide)")):
        slides = {"wsi": {"big": {"size": size, "peak_rss_gb": gb}}}
        assert {t["name"]: t["status"] for t in evaluate_targets(slides, "cpu")}["wsi_peak_rss_gb"] == status


def test_markdown(bench):
    text = render_markdown(bench)
    assert text.startswith("## pcamx bench: cpu (") and "tiny at 32 px" in text
    for title in ("### 1. Input pipeline", "### 2. Evaluation with TTA", "### 3. Training step",
                  "### 4. Compressed models", "### 5. Model FLOPs utilization", "### 6. Whole slides", "### Targets"):
        assert title in text
    assert "| host side, train |" in text and "| fullft compiled | skipped: --quick |" in text
    assert "Same probabilities: max |Δp|" in text and ": pass;" in text and "skipped: no CUDA" in text
    assert "| all_r0.75_activation |" in text and "| gpu_training_mfu |" in text and "n/a (GPU target)" in text
