"""Hyperparameter search on pcamx itself (hparams_search=demo: synthetic data, the tiny model, seconds a trial):
a study continued to more trials, the objective read from validation and never from test, a failing trial, two
objectives, and a study on a real Slurm. The sweeper's own semantics on toy apps: test_optuna_sweeper.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_local_slurm import PARTITION, VENV

from conftest import REPO

pytestmark = pytest.mark.slow
SMALL = ["data.n_train=512", "data.n_valid=128", "data.n_test=128"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("search") / "data"


def search(sweep: Path, data_root: Path, *extra: str, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "run.py", "hparams_search=demo", *SMALL, f"data.root={data_root}",
                           f"hydra.sweep.dir={sweep}", *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                                            **(env or {})})
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def trials(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def results(sweep: Path) -> dict:
    return yaml.safe_load((sweep / "optimization_results.yaml").read_text())


def metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def test_a_study_continues_and_its_best_value_is_a_validation_metric(data_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    search(sweep, data_root, "hydra.sweeper.n_trials=3")
    assert [t["number"] for t in trials(sweep)] == ["0", "1", "2"]
    search(sweep, data_root, "hydra.sweeper.n_trials=5")  # the same command, more trials: continued, not redone
    rows = trials(sweep)
    assert [t["number"] for t in rows] == [str(i) for i in range(5)]
    assert all(Path(t["run_dir"]) == sweep / t["number"] for t in rows)  # trial n ran as job n
    # The median pruner may stop a trial that trails the others: status pruned, not a failure.
    assert {t["state"] for t in rows} <= {"COMPLETE", "PRUNED"}
    assert all(metrics(t["run_dir"])["status"] == "pruned" for t in rows if t["state"] == "PRUNED")
    runs = {int(t["number"]): metrics(t["run_dir"]) for t in rows if t["state"] == "COMPLETE"}
    best = results(sweep)
    assert best["objectives"] == ["val.auroc"] and best["directions"] == ["maximize"]
    val = {n: m["val"]["auroc"] for n, m in runs.items()}
    assert best["best_value"] == max(val.values()) and best["best_trial"] == max(val, key=val.get)
    for n, m in runs.items():  # every trial's objective is its best checkpoint's validation AUROC, not test's
        assert float(rows[n]["value"]) == m["val"]["auroc"]
    assert "hydra.mode=RUN" in best["best_command"] and (sweep / "optimization_history.png").is_file()
    assert "| 4 |" in (sweep / "summary.md").read_text()  # the sweep's table, as for any multirun


def test_a_failing_trial_is_recorded_and_the_study_completes(data_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # Every combination once: one learning rate trains, the other collapses the model (stopped, reason collapsed).
    proc = search(sweep, data_root, "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
                  "~hydra.sweeper.sampler.n_startup_trials", "hydra.sweeper.n_trials=2", "train.weight_decay=0.0001",
                  "train.lr=choice(0.001,10000)", "train.grad_clip=0", "train.warmup_steps=0", check=False)
    assert proc.returncode == 1  # the sweep's table is written, and a failed run fails the command
    rows = {float(t["train.lr"]): t for t in trials(sweep)}
    assert rows[0.001]["state"] == "COMPLETE" and rows[10000.0]["state"] == "FAIL"
    assert "collapsed" in rows[10000.0]["note"]
    assert results(sweep)["best_params"] == {"train.lr": 0.001}


def test_two_objectives_give_a_pareto_front(data_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    search(sweep, data_root, "prune=heads", "prune.tau=interval(0.2,1.0)", "hydra.sweeper.n_trials=4",
           "hydra.sweeper.pruner=null", "hydra.sweeper.direction=[maximize,minimize]",
           "hydra.sweeper.objectives=[val_final.auroc,gflops]")
    rows = [t for t in trials(sweep) if t["state"] == "COMPLETE"]
    points = {int(t["number"]): (float(t["value_0"]), float(t["value_1"])) for t in rows}
    for t in rows:  # the objectives are the compressed model's validation AUROC and its GFLOPs
        m = metrics(t["run_dir"])
        assert points[int(t["number"])] == (m["val_final"]["auroc"], m["gflops"])

    def dominated(p: tuple[float, float]) -> bool:
        return any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points.values())

    front = {t["number"] for t in results(sweep)["best_trials"]}
    assert front == {n for n, p in points.items() if not dominated(p)} and front
    assert (sweep / "pareto_front.png").is_file()


@pytest.mark.slurm
def test_a_study_on_slurm_runs_its_trials_as_jobs(local_slurm, data_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    search(sweep, data_root, "hardware=a100", "hardware.device=cpu", "hardware.compile=false",
           "hardware.precision=fp32", "hardware.num_threads=1", "hydra.launcher.gpus_per_node=null",
           f"hydra.launcher.partition={PARTITION}", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
           f"hydra.launcher.setup=['export PATH={VENV}:$PATH']", "hydra.sweeper.n_trials=2",
           "hydra.sweeper.n_jobs=2", env=local_slurm)
    assert [t["state"] for t in trials(sweep)] == ["COMPLETE", "COMPLETE"]
    # Both trials ran as tasks of one Slurm job array, not on the submitting machine.
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1
    assert results(sweep)["best_value"] == max(metrics(sweep / str(i))["val"]["auroc"] for i in range(2))
