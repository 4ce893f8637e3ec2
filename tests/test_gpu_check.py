"""scripts/gpu_check.sh, without a GPU: --dry-run checks every step's command; the artifact check of the
end-to-end step finds what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ("install", "imports", "pytest_cuda", "e2e", "bench")


def wheels_dir(tmp_path: Path, skip: str | None = None) -> Path:
    """Stand-ins named like the wheels of scripts/gpu-wheels.txt (the dry run only lists them)."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for line in (REPO / "scripts" / "gpu-wheels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            if name != skip:
                (wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    return wheels


def dry_run(tmp_path: Path, wheels: Path, *extra: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--wheels", str(wheels), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_checks_every_step_and_writes_the_report(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, wheels_dir(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert report.startswith("# pcamx GPU check — dry run")
    for step in STEPS:
        assert f"| {step} | checked |" in report, step
        assert (tmp_path / "out" / f"{step}.log").is_file()
    logs = {step: (tmp_path / "out" / f"{step}.log").read_text() for step in STEPS}
    assert "would install torchao-" in logs["install"] and "would install pcamx" in logs["install"]
    assert "\nFAILED" not in logs["imports"] and "\nok hydra_plugins.hydra_submitit_launcher" in logs["imports"]
    # The CUDA tests are collected (and only they), the run.py commands compose, the bench parses.
    assert "test_compiled_train_step_equals_eager" in logs["pytest_cuda"]
    assert "test_bf16_autocast_train_step_on_the_cpu" not in logs["pytest_cuda"]
    assert logs["e2e"].count("ok: run.py") == 2 and "hardware.compile=true" in logs["e2e"]
    assert "device='cuda'" in logs["bench"] and "batch_size=256" in logs["bench"]
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what the GPU machine sends back: 8 files at most


def test_dry_run_says_which_wheel_is_missing(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, wheels_dir(tmp_path, skip="torchao"), "--steps", "install")
    assert proc.returncode == 1
    log = (tmp_path / "out" / "install.log").read_text()
    assert "missing wheels" in log and "torchao" in log and "make gpu-wheels" in log
    assert "| install | failed |" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_e2e_artifact_check_names_what_is_missing(tmp_path: Path) -> None:
    train, sweep = tmp_path / "train", tmp_path / "sweep"
    for run_dir, files in ((train, ["metrics.json", "predictions.csv", "roc.png", "resolved_config.yaml", "best.pt"]),
                           (sweep / "0", ["metrics.json", "predictions.csv", "roc.png", "resolved_config.yaml",
                                          "compressed/model.safetensors", "compressed/architecture.json"])):
        for name in files:
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / name).write_text(json.dumps({"status": "ok", "auroc": 0.9}) if name == "metrics.json" else "")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--check-e2e", str(train),
                           str(sweep), "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "train: no last.pt" in proc.stdout and "sweep: no summary.md" in proc.stdout
    assert "expected the training run and 2 compressed runs" in proc.stdout
    assert json.loads((tmp_path / "e2e_metrics.json").read_text())["train"]["auroc"] == 0.9
    assert "predict_int8.csv: not written" in proc.stdout


def test_e2e_check_compares_predict_with_the_runs_predictions(tmp_path: Path) -> None:
    out, train = tmp_path / "out", tmp_path / "train"
    out.mkdir(), train.mkdir()
    (train / "predictions.csv").write_text("index,label,prob\n0,1,0.90000000\n1,0,0.20000000\n")
    (out / "predict_train.csv").write_text("source,index,prob,pred\nx.h5,0,0.90000001,1\nx.h5,1,0.20050000,0\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--check-e2e", str(train),
                           str(tmp_path / "sweep"), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert "predict_train.csv: max |Δp| 0.0005 against" in proc.stdout
    assert json.loads((out / "e2e_metrics.json").read_text())["predict_train.csv"][
        "max_abs_diff_vs_predictions_csv"] == pytest.approx(5e-4)
