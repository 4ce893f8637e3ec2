"""The reference-style table (`python -m pcamx.report --style reference`) reproduces the published table's
layout, labels and percentages from fabricated runs, and renders a real local sweep with all 12 row kinds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import REPO
from pcamx.report.__main__ import main as cli
from pcamx.report.format import format_change, format_value, percent_change
from pcamx.report.reference_table import lora_label
from pcamx.report.runs import collect_runs

# The published table, as docs/reference.md holds it.
PUBLISHED = "\n".join(line for line in (REPO / "docs" / "reference.md").read_text().split("## The protocol")[0]
                      .splitlines() if line.startswith("| ")) + "\n"

FULL = {"params": 21_601_346, "gflops": 8.6706}
SMALL = {"params": 20_080_112, "gflops": 8.0601}
LORA_CONFIG = {"name": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
               "include_mlp": True}
PLAN = {"method": "all", "tau_heads": 0.89, "tau_mlp": 0.975, "tau_svd": 0.975}
METRICS = ("auroc", "auprc", "sens_at_95spec", "ece", "brier", "acc", "nll")
# (method, pruned, quant, memory_mb, the seven metrics): the raw numbers behind the published rows.
ROWS = [
    ("fullft", False, "none", 86.52, (0.98001, 0.9820, 0.9202, 0.0209, 0.0603, 0.9202, 0.2116)),
    ("fullft", False, "bf16", 43.26, (0.97998, 0.9820, 0.9195, 0.0215, 0.0602, 0.9200, 0.2115)),
    ("lora", False, "none", 86.52, (0.9746, 0.9786, 0.9091, 0.0148, 0.0631, 0.9190, 0.2229)),
    ("lora", False, "bf16", 43.26, (0.9746, 0.9785, 0.9082, 0.0146, 0.0631, 0.9183, 0.2230)),
    ("head_only", False, "none", 86.52, (0.9714, 0.9742, 0.8808, 0.0186, 0.0654, 0.9131, 0.2274)),
    ("head_only", False, "bf16", 43.26, (0.9714, 0.9742, 0.8793, 0.0177, 0.0659, 0.9122, 0.2289)),
    ("fullft", True, "none", 80.43, (0.9537, 0.9630, 0.8452, 0.0408, 0.1046, 0.8553, 0.3385)),
    ("fullft", True, "bf16", 40.30, (0.9532, 0.9628, 0.8439, 0.0390, 0.1046, 0.8545, 0.3388)),
    ("lora", True, "none", 80.43, (0.9513, 0.9607, 0.8423, 0.0322, 0.1064, 0.8527, 0.3445)),
    ("lora", True, "bf16", 40.30, (0.9521, 0.9612, 0.8451, 0.0321, 0.1058, 0.8538, 0.3427)),
    ("head_only", True, "none", 80.43, (0.9307, 0.9314, 0.6870, 0.0230, 0.1046, 0.8577, 0.3452)),
    ("head_only", True, "bf16", 40.30, (0.9316, 0.9323, 0.6889, 0.0226, 0.1038, 0.8591, 0.3427)),
]


def published_runs(root: Path) -> Path:
    """Twelve run directories in shuffled job order: the table must order them itself."""
    order = list(range(len(ROWS)))
    random.Random(0).shuffle(order)
    for job, i in enumerate(order):
        method, pruned, quant, memory, values = ROWS[i]
        run = root / str(job)
        run.mkdir(parents=True)
        config = LORA_CONFIG if method == "lora" else {"name": method}
        (run / "metrics.json").write_text(json.dumps({
            "status": "ok", **(SMALL if pruned else FULL), "memory_mb": memory,
            **dict(zip(METRICS, values, strict=True)), "method": method, "method_config": config, "quant": quant,
            "prune": PLAN if pruned else {"method": "none"},
            "eval_precision": "fp32" if quant == "none" else "bf16", "tta": True, "tta_views": 6, "resolution": 224,
            "n_test": 32768, "data": "pcam", "model": "dinov3_vits16", "run_dir": str(run),
        }))
    return root


def table_block(md: str) -> str:
    return "".join(line + "\n" for line in md.splitlines() if line.startswith("| "))


def test_reference_style_reproduces_the_published_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = published_runs(tmp_path / "sweep")
    assert cli([str(sweep), "--style", "reference"]) == 0
    md = (sweep / "summary.md").read_text()
    assert table_block(md) == PUBLISHED
    baseline = next(r for r in collect_runs([sweep]) if r.metrics["auroc"] == 0.98001)
    assert f"against the Full fine‑tune (FT), none (f32) run ({baseline.run_dir})" in md
    assert "test split n=32768, TTA: mean of softmax probabilities over 6 views, 224×224 px inputs, data: pcam" in md
    assert md.count(f"`{sweep}/") == 12  # every row names its run directory
    assert "| Method | Quantization |" in capsys.readouterr().out


def test_another_baseline_moves_every_percentage(tmp_path: Path) -> None:
    sweep = published_runs(tmp_path / "sweep")
    lora = next(r for r in collect_runs([sweep]) if r.method == "lora" and r.quant == "none"
                and not r.compressed_model)
    assert cli([str(sweep), "--style", "reference", "--baseline", str(lora.run_dir)]) == 0
    rows = [line.split(" | ") for line in table_block((sweep / "summary.md").read_text()).splitlines()[2:]]
    # Full FT f32 vs LoRA f32: (0.98001 - 0.9746) / 0.9746 = +0.555% → ↑0.6%; the LoRA row itself: none.
    assert rows[0][5] == "0.9800 (↑0.6%)" and rows[2][5] == "0.9746"
    # Head-only compressed f32 vs LoRA: (0.9307 - 0.9746) / 0.9746 = -4.504% → ↓4.5%.
    assert rows[10][5] == "0.9307 (↓4.5%)"
    with pytest.raises(SystemExit) as usage_error:  # not one of the runs
        cli([str(sweep), "--style", "reference", "--baseline", str(tmp_path)])
    assert usage_error.value.code == 2


def test_without_a_baseline_no_changes_are_shown(tmp_path: Path) -> None:
    sweep = published_runs(tmp_path / "sweep")
    for run in collect_runs([sweep]):
        if run.method == "fullft":
            (run.run_dir / "metrics.json").unlink()
            run.run_dir.rmdir()
    assert cli([str(sweep), "--style", "reference"]) == 0
    md = (sweep / "summary.md").read_text()
    assert "No baseline run" in md and "↓" not in table_block(md)
    assert table_block(md).splitlines()[2].startswith("| LoRA (r=8; attn+MLP adapters) | none (f32) | 21.60M |")


def test_formatting_rules() -> None:
    assert format_value("memory_mb", 86.52) == "86.5" and format_value("gflops", 0.0012) == "0.0012"
    assert format_value("params", 250_050) == "0.25M" and format_value("auroc", None) == "—"
    assert format_change(percent_change(43.26, 86.52)) == " (↓50.0%)"
    assert format_change(percent_change(0.97998, 0.98001)) == ""  # rounds to 0.0%: not shown
    assert format_change(percent_change(1.1, 1.0)) == " (↑10.0%)" and percent_change(1.0, 0) is None
    assert percent_change(20.08, 21.60) == pytest.approx(100 * (20.08 - 21.60) / 21.60)
    assert lora_label({"r": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}) == "LoRA (r=16; attn adapters)"
    assert lora_label({"r": 4, "targets": ["q_proj", "v_proj"]}) == "LoRA (r=4; q_proj+v_proj adapters)"
    assert lora_label({}) == "LoRA"


def test_default_style_keeps_working_and_states_precision_views_and_resolution(tmp_path: Path) -> None:
    sweep = published_runs(tmp_path / "sweep")
    assert cli([str(sweep)]) == 0
    md = (sweep / "summary.md").read_text()
    assert md.startswith("# Sweep summary") and "tta_views: 6 · resolution: 224" in md
    assert "| none (f32) |" in md and "| bf16 |" in md
