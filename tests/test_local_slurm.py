"""The hardware=a100 (Slurm) path against a real single-node Slurm started for the session
(scripts/local_slurm.sh): a job array, a job cancelled with scancel, and a timeout → USR2 → requeue →
resume that ends exactly where an uninterrupted run does."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, fast_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
PARTITION = "pcamx-test"
VENV = Path(sys.executable).parent


def slurm_sweep(root: Path, sweep: Path, *extra: str) -> list[str]:
    """hardware=a100 with CPU overrides: what a user would try on the local cluster before the real one."""
    fast = [o for o in fast_overrides(root) if not o.startswith("hardware=")]
    return [sys.executable, "run.py", "-m", "hardware=a100", *fast, "hardware.device=cpu", "hardware.compile=false",
            "hardware.precision=fp32", "hardware.num_threads=1",
            "hydra.launcher.gpus_per_node=null", f"hydra.launcher.partition={PARTITION}",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            f"hydra.launcher.setup=['export PATH={VENV}:$PATH']", *extra, f"hydra.sweep.dir={sweep}"]


def env(local_slurm: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **local_slurm, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def rows(sweep: Path) -> dict[str, dict[str, str]]:
    with open(sweep / "summary.csv", newline="") as f:
        return {r["job"]: r for r in csv.DictReader(f)}


def test_a100_preset_runs_a_job_array_on_slurm(local_slurm, small_pcam: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(slurm_sweep(small_pcam, sweep, "method=head_only,lora"), cwd=REPO, env=env(local_slurm),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = rows(sweep)
    assert [(j, r["status"], r["method"]) for j, r in table.items()] == [("0", "ok", "head_only"), ("1", "ok", "lora")]
    # Both ran as tasks of one Slurm array (job ids <array>_<task>), not on the submitting machine.
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1
    assert "| 0 |" in (sweep / "summary.md").read_text()
    # Without accounting sacct fails on every poll: said once, then counted.
    assert proc.stdout.count("Bypassing sacct error") + proc.stderr.count("Bypassing sacct error") == 0


def test_a_cancelled_job_is_a_failed_row_and_the_command_fails(local_slurm, small_pcam: Path,
                                                               tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(slurm_sweep(small_pcam, sweep, "train.epochs=1,400"), cwd=REPO, env=env(local_slurm),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.time() + 180
    while victim is None and time.time() < deadline and proc.poll() is None:
        for log in (sweep / ".submitit").glob("*_1/*_log.*"):
            if "400 epochs" in log.read_text():
                victim = log.parent.name  # <array id>_1
        time.sleep(0.5)
    assert victim is not None, "the long job never started"
    subprocess.run(["scancel", victim], env=env(local_slurm), check=True, timeout=30)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    table = rows(sweep)
    assert table["0"]["status"] == "ok" and table["1"]["status"] in ("failed", "interrupted")
    assert table["1"]["override.train.epochs"] == "400" and (sweep / "summary.md").is_file()


def test_timeout_requeue_resumes_and_ends_like_an_uninterrupted_run(local_slurm, small_pcam: Path,
                                                                    tmp_path: Path) -> None:
    """One-minute time limit, USR2 25 s before it: the job saves after its current step, submitit requeues
    it, Slurm starts it again (after its ~2-minute requeue delay) and it resumes from that step."""
    long_run = ["train.epochs=150", "data.limit_val=32"]
    sweep = tmp_path / "sweep"
    reference_dir = tmp_path / "uninterrupted"
    # The uninterrupted run of the same config goes on meanwhile (the Slurm job waits out its requeue delay).
    reference = subprocess.Popen(
        [sys.executable, "run.py", *fast_overrides(small_pcam, "hardware.num_threads=1",
                                                   *long_run), f"hydra.run.dir={reference_dir}"],
        cwd=REPO, env=env(local_slurm), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(slurm_sweep(small_pcam, sweep, *long_run, "hydra.launcher.timeout_min=1",
                                      "hydra.launcher.signal_delay_s=25", "hydra.launcher.max_num_timeout=10"),
                          cwd=REPO, env=env(local_slurm), capture_output=True, text=True, timeout=900)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (sweep / "0" / "run.log").read_text()
    assert "resumed from step" in log, "the job was never requeued: lengthen the training"
    resumed = json.loads((sweep / "0" / "metrics.json").read_text())
    uninterrupted = json.loads((reference_dir / "metrics.json").read_text())
    assert resumed["train_steps"] == uninterrupted["train_steps"] == 600
    for key in ("auroc", "nll", "brier", "ece", "acc", "sens_at_95spec"):
        assert resumed[key] == uninterrupted[key], key
    assert (sweep / "0" / "predictions.csv").read_text() == (reference_dir / "predictions.csv").read_text()
