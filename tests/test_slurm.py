"""Slurm sweeps through the submitit launcher: hardware=a100 (composition and the sbatch script it
renders, with fake `sbatch`/`srun`; no cluster needed) and hardware=submitit_local, which runs the
same submitit code path on this machine (pickled task function, one process per job)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import stat
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from conftest import CONF, REPO, fast_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP_TIMEOUT_S = 300


def launcher_target(cfg: DictConfig) -> str:
    return cfg.hydra.launcher._target_.rsplit(".", 1)[-1]


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> Path:
    """A copy of conf/ without conf/local/: the defaults as shipped, whatever this checkout's local files say."""
    copy = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(CONF, copy, ignore=lambda d, names: ["local"] if Path(d) == CONF else [])
    return copy


def compose_from(conf: Path, *overrides: str) -> DictConfig:
    """What `python run.py <overrides>` composes, Hydra's own node included."""
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


# ---------------------------------------------------------------- hardware=a100: composition


def test_a100_composes_the_slurm_launcher_with_the_documented_settings(conf: Path) -> None:
    cfg = compose_from(conf, "hardware=a100")
    assert cfg.hydra.mode == RunMode.MULTIRUN  # `python run.py hardware=a100` submits, no login-node run
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    assert launcher_target(cfg) == "ReportingSlurmLauncher"  # reports jobs lost to OOM, scancel, node failure
    hw = cfg.hardware
    assert (hw.device, hw.precision, hw.compile, hw.num_threads) == ("cuda", "bf16", True, None)
    launcher = cfg.hydra.launcher
    expected = {"gpus_per_node": 1, "timeout_min": 240, "cpus_per_task": 8, "mem_gb": 64, "nodes": 1,
                "tasks_per_node": 1, "array_parallelism": 16, "max_num_timeout": 3, "name": "pcamx",
                "partition": None, "account": None, "qos": None, "constraint": None, "gres": None}
    assert {k: launcher[k] for k in expected} == expected
    raw = OmegaConf.to_container(launcher, resolve=False)
    assert raw["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert raw["setup"] == ["source ${hydra.runtime.cwd}/.venv/bin/activate"]


@pytest.mark.parametrize("option", ["auto", "cpu", "cuda", "mps"])
def test_other_hardware_keeps_the_basic_launcher(conf: Path, option: str) -> None:
    cfg = compose_from(conf, f"hardware={option}")
    assert launcher_target(cfg) == "BasicLauncher" and cfg.hydra.mode is None


def test_submitit_local_runs_on_the_cpu_as_a_multirun(conf: Path) -> None:
    cfg = compose_from(conf, "hardware=submitit_local")
    assert launcher_target(cfg) == "ReportingLocalLauncher" and cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hardware.device == "cpu" and cfg.hydra.sweeper.max_batch_size == 2


def test_local_slurm_file_and_command_line_override_the_cluster_settings(conf: Path, tmp_path: Path) -> None:
    """conf/local/slurm.yaml (git-ignored) is read after hardware/a100.yaml and only with it; the
    command line wins over both. Checked on a copy of conf/ so a real local file is never touched."""
    conf = shutil.copytree(conf, tmp_path / "conf")
    (conf / "local").mkdir()
    (conf / "local" / "slurm.yaml").write_text(
        "hydra:\n  launcher:\n    partition: gpu-a100\n    account: my-lab\n    timeout_min: 600\n"
        "    setup: [module load cuda/12.4, source /opt/venvs/pcamx/bin/activate]\n"
        "hardware:\n  compile: false\n")

    cfg = compose_from(conf, "hardware=a100", "hydra.launcher.account=other-lab")
    launcher = cfg.hydra.launcher
    assert (launcher.partition, launcher.account, launcher.timeout_min) == ("gpu-a100", "other-lab", 600)
    assert list(launcher.setup) == ["module load cuda/12.4", "source /opt/venvs/pcamx/bin/activate"]
    assert launcher.gpus_per_node == 1 and cfg.hardware.compile is False
    # Runs on other hardware do not read the file: their basic launcher has no partition key.
    cfg = compose_from(conf, "hardware=cpu")
    assert launcher_target(cfg) == "BasicLauncher" and cfg.hardware.compile is False


# ---------------------------------------------------------------- hardware=a100: the sbatch script


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`srun` (submitit checks that it exists) and an `sbatch` that keeps the script and answers like
    Slurm, first on PATH. Returns where the submitted script is copied."""
    bin_dir, captured = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    scripts = {"srun": "exit 0\n", "sbatch": f'cp "$1" {captured}\necho "Submitted batch job 4242"\n'}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # The launcher waits for every job's result; there is no cluster to deliver one.
    import submitit.slurm.slurm

    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "done", lambda self, force_check=False: True)
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results", lambda self: ["submitted"])
    return captured


def test_a100_sbatch_script_has_the_gpu_time_partition_and_setup_lines(conf: Path, tmp_path: Path,
                                                                       fake_slurm: Path) -> None:
    """The launcher Hydra builds from hardware=a100 submits a 2-job array; its sbatch script says so."""
    sweep = tmp_path / "sweep"
    cfg = compose_from(conf, "hardware=a100", "hydra.launcher.partition=gpu-a100", "hydra.launcher.qos=normal",
                       f"hydra.sweep.dir={sweep}")
    launcher = Plugins.instance().instantiate_launcher(hydra_context=None, task_function=lambda c: None, config=cfg)
    returns = launcher.launch([["method=head_only"], ["method=lora"]], initial_job_idx=0)
    assert returns == ["submitted", "submitted"]

    script = fake_slurm.read_text()
    lines = script.splitlines()
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --time=240", "#SBATCH --partition=gpu-a100",
                 "#SBATCH --qos=normal", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB",
                 "#SBATCH --job-name=pcamx", "#SBATCH --array=0-1%2", "#SBATCH --signal=USR2@120",
                 f"source {cfg.hydra.runtime.cwd}/.venv/bin/activate"):
        assert line in lines, f"{line!r} not in the sbatch script:\n{script}"
    assert not any(re.match(r"#SBATCH --(account|constraint|gres)\b", line) for line in lines)  # null: not passed
    # setup runs before the job starts; logs and pickles go to <sweep dir>/.submitit/<array id>_<task>.
    assert lines.index(f"source {cfg.hydra.runtime.cwd}/.venv/bin/activate") < next(
        i for i, line in enumerate(lines) if line.startswith("srun "))
    assert f"#SBATCH --output={sweep}/.submitit/%A_%a/%A_%a_0_log.out" in lines
    assert f"-m submitit.core._submit {sweep}/.submitit/%j" in script
    assert (sweep / ".submitit" / "4242" / "4242_submission.sh").exists()
    assert len(list((sweep / ".submitit").glob("4242_*/4242_*_submitted.pkl"))) == 2


# ---------------------------------------------------------------- hardware=submitit_local: real sweeps


def sweep_command(root: Path, sweep_dir: Path, *overrides: str, multirun: bool = True) -> list[str]:
    """`python run.py [-m] hardware=submitit_local` with the tiny fast pipeline, one torch thread per job
    (hardware=submitit_local runs two jobs at a time)."""
    fast = [o for o in fast_overrides(root) if not o.startswith("hardware=")]
    return [sys.executable, "run.py", *(["-m"] if multirun else []), "hardware=submitit_local", *fast,
            "hardware.num_threads=1", *overrides, f"hydra.sweep.dir={sweep_dir}"]


def run_sweep(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_rows(path: Path) -> list[list[str]]:
    rows = [line for line in path.read_text().splitlines() if re.match(r"^\| \d+(,\d+)* \|", line)]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]


@pytest.fixture(scope="module")
def local_sweep(small_pcam: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    sweep = tmp_path_factory.mktemp("submitit_local") / "sweep"
    proc = run_sweep(sweep_command(small_pcam, sweep, "method=lora", "seed=1,2,3"))
    return sweep, proc


@pytest.mark.slow
def test_submitit_local_sweep_writes_the_summary(local_sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    sweep, proc = local_sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_csv(sweep / "summary.csv")  # every run
    assert [(r["job"], r["status"], r["override.seed"]) for r in rows] == [
        (str(i), "ok", str(i + 1)) for i in range(3)]
    for row in rows:
        assert Path(row["run_dir"]).parent == sweep and 0.0 <= float(row["auroc"]) <= 1.0
    # The table: the three seeds in one row, mean ± sd over them, n = 3.
    ((job, seeds, *cells),) = md_rows(sweep / "summary.md")
    assert (job, seeds, cells[-1]) == ("0,1,2", "1,2,3", "3")
    aurocs = [float(r["auroc"]) for r in rows]
    assert f"{statistics.mean(aurocs):.4f} ± {statistics.stdev(aurocs):.4f}" in cells
    assert (sweep / "roc.png").read_bytes().startswith(PNG_MAGIC)
    assert (sweep / "calibration.png").read_bytes().startswith(PNG_MAGIC)
    # It went through submitit: one process per job, each with its logs and result under .submitit/.
    assert len(list((sweep / ".submitit").glob("*/*_0_log.out"))) == 3
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 3


@pytest.mark.slow
def test_failed_job_is_reported_and_fails_the_command(small_pcam: Path, tmp_path: Path) -> None:
    """No -m: hardware=submitit_local makes every command a multirun (a comma list would be an error
    in a single run)."""
    sweep = tmp_path / "sweep"
    proc = run_sweep(sweep_command(small_pcam, sweep, "eval.tta_views=8,4", multirun=False))
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_csv(sweep / "summary.csv")
    assert [(r["job"], r["status"], r["override.eval.tta_views"]) for r in rows] == [
        ("0", "ok", "8"), ("1", "failed", "4")]
    assert "eval.tta_views=4 is out of range: it must be one of 1, 6, 8" in rows[1]["error"]
    md = {row[0]: row for row in md_rows(sweep / "summary.md")}
    assert md["0"][-1] == "ok" and md["1"][-1].startswith("failed: ConfigError: eval.tta_views")
    assert (sweep / "roc.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_report_cli_rebuilds_the_callbacks_table(local_sweep: tuple[Path, subprocess.CompletedProcess],
                                                 tmp_path: Path) -> None:
    """What to run when the launcher process died: the table from the run directories alone."""
    sweep, proc = local_sweep
    assert proc.returncode == 0
    out = tmp_path / "rebuilt"
    rebuilt = subprocess.run([sys.executable, "-m", "pcamx.report", str(sweep), "--out", str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert read_csv(out / "summary.csv") == read_csv(sweep / "summary.csv")
    assert md_rows(out / "summary.md") == md_rows(sweep / "summary.md")
    assert (out / "roc.png").read_bytes().startswith(PNG_MAGIC)
