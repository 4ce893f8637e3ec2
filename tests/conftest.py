"""Shared fixtures: composed configs, a small synthetic PCam-layout dataset, quiet W&B."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

import pcamx.config
from pcamx.runtime.conf import conf_defaults

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SMALL_SIZES = {"train": 512, "valid": 128, "test": 128}

os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.cuda` tests are skipped, with the reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs CUDA (torch {torch.__version__} sees no CUDA device)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not `in keywords`: a test id such as [cuda] is one
            item.add_marker(skip)


def compose_config(*overrides: str, hydra_config: bool = False) -> DictConfig:
    """The config `python run.py <overrides>` would run with."""
    return pcamx.config.compose(*overrides, hydra_config=hydra_config)


def method_config(option: str, /, **overrides) -> dict:
    """conf/method/<name>.yaml as composed, with `overrides`: what `method=<name> method.k=v` runs with."""
    return {**OmegaConf.to_container(compose_config(f"method={option}").method), **overrides}


# A 2-layer, 32-wide member of the tiny architecture: fast enough for any unit test.
TINY_ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_MODEL = {"name_or_path": None, "architecture": "tiny", "config": TINY_ARCH}


@pytest.fixture(scope="session")
def small_pcam(tmp_path_factory) -> Path:
    """A small synthetic dataset in the official file layout."""
    from pcamx.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("pcam") / "small", SMALL_SIZES, seed=0)


def prune_plan(method: str, tau=None, **keys):
    """compress.chain.plan with conf/prune's defaults for every key not given, as a composed run has them."""
    from pcamx.compress.chain import plan

    settings = {**conf_defaults("prune"), **keys}
    del settings["method"], settings["tau"]
    return plan(method, tau, **settings)


def fast_overrides(root: Path, *extra: str) -> list[str]:
    """A few steps of the tiny model on `root`: the whole pipeline in seconds."""
    return [
        "model=dinov3_tiny",
        "debug=fast",
        "data.name=pcam",
        f"data.root={root}",
        "data.resolution=32",
        "hardware=cpu",
        *extra,
    ]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """`python run.py experiment=demo`, exactly as `make demo` runs it (synthetic data under tmp).
    The data lives in `<run_dir>/../synthetic`."""
    tmp = tmp_path_factory.mktemp("demo")
    run_dir = tmp / "run"
    subprocess.run(
        [sys.executable, "run.py", "experiment=demo", f"hydra.run.dir={run_dir}", f"data.root={tmp / 'synthetic'}"],
        cwd=REPO, check=True, timeout=900,
    )
    return run_dir


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["index", "label", "prob"]
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["prob"]) for r in rows])


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real single-node Slurm (scripts/local_slurm.sh): the one CI started (PCAMX_SLURM_DIR, left running
    for CI to stop), or a private one for this session, stopped and removed at its end. Skips, saying why,
    where neither is possible (no Slurm and no root + apt to install it)."""
    script = REPO / "scripts" / "local_slurm.sh"
    shared = os.environ.get("PCAMX_SLURM_DIR")
    if shared and subprocess.run([str(script), "status"], env=os.environ, capture_output=True).returncode == 0:
        yield {"SLURM_CONF": str(Path(shared) / "slurm.conf"), "PCAMX_SLURM_DIR": shared}
        return
    if not shutil.which("slurmctld") and not (os.geteuid() == 0 and shutil.which("apt-get")):
        pytest.skip("no Slurm here, and installing it (apt-get install slurm-wlm munge) needs root")
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PCAMX_SLURM_DIR": str(directory)}
    started = subprocess.run([str(script), "start"], env=env, capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.skip(f"could not start a local Slurm: {started.stderr.strip()[-500:]}")
    try:
        yield {"SLURM_CONF": str(directory / "slurm.conf"), "PCAMX_SLURM_DIR": str(directory)}
    finally:
        subprocess.run([str(script), "stop"], env=env, capture_output=True, timeout=120)
