"""Shared fixtures: composed configs, a small synthetic PCam-layout dataset, quiet W&B."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import pcamx.config
from pcamx.model import PCamClassifier, build_model
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


# ---------------------------------------------------------------- the tests' model

# A member of the tiny architecture small enough for any unit test: 2 blocks of 4 heads (head_dim 8), 32 wide,
# MLP 64, 32 px inputs.
HIDDEN, HEADS, HEAD_DIM, WIDTH, LAYERS = 32, 4, 8, 64, 2
VISIBLE_STD = 0.2  # tiny_model(std=...): weights at which every head and neuron visibly matters
TINY_ARCH = {"hidden_size": HIDDEN, "intermediate_size": WIDTH, "num_hidden_layers": LAYERS,
             "num_attention_heads": HEADS, "image_size": 32}
TINY_MODEL = {"name_or_path": None, "architecture": "tiny", "config": TINY_ARCH}


def tiny_model(seed: int = 0, *, std: float | None = None, head_std: float | None = None, **arch) -> PCamClassifier:
    """The tests' classifier, in eval mode, seeded. `std`: every weight drawn from N(0, std²), large enough that
    every head and neuron visibly matters (the default init's 0.02 moves outputs by less than 1e-6); `head_std`:
    only the head's weight, to spread the logits so that comparisons of probabilities can fail."""
    torch.manual_seed(seed)
    model = build_model({**TINY_MODEL, "config": {**TINY_ARCH, **arch}}).eval()
    with torch.no_grad():
        if std is not None:
            generator = torch.Generator().manual_seed(seed)
            for param in model.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        if head_std is not None:
            model.head.weight.normal_(0.0, head_std)
    return model


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Preprocessed-looking float images for the tiny model."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    return model(images() if x is None else x)


def layers(model: PCamClassifier) -> list[torch.nn.Module]:
    return list(model.backbone.model.layer)


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


# ---------------------------------------------------------------- fabricated run directories (report tests)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_CONTEXT = {"data": "synthetic", "model": "dinov3_tiny", "tta": True, "tta_views": 8, "resolution": 32, "n_test": 64}
REFERENCE = {"params": 21_600_000, "gflops": 4.61, "memory_mb": 82.4, "auroc": 0.9540, "auprc": 0.95,
             "sens_at_95spec": 0.8, "ece": 0.03, "brier": 0.07, "acc": 0.9, "nll": 0.25}


def run_metrics(method: str, quant: str = "none", prune: dict | None = None, **values) -> dict:
    return {"status": "ok", **REFERENCE, **RUN_CONTEXT, "method": method, "quant": quant,
            "prune": prune or {"method": "none", "tau_heads": None, "tau_mlp": None, "tau_svd": None}, **values}


def make_run(root: Path, job: str, overrides: list[str], metrics_json: dict | None,
             config: dict | None = None, seed: int = 0) -> Path:
    run_dir = root / job
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    if config is not None:
        (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    if metrics_json is not None:
        (run_dir / "metrics.json").write_text(json.dumps({**metrics_json, "run_dir": str(run_dir)}))
    if metrics_json is not None and metrics_json.get("status") == "ok":
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 2, 64)
        probs = np.clip(0.35 * labels + 0.65 * rng.random(64), 0, 1)
        rows = "".join(f"{i},{y},{p:.8f}\n" for i, (y, p) in enumerate(zip(labels, probs, strict=True)))
        (run_dir / "predictions.csv").write_text("index,label,prob\n" + rows)
    return run_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_rows(md: str) -> list[list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]
