"""W&B logging: off unless enabled, mode from WANDB_MODE, and a run logs config, curves, metrics, ROC."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from conftest import compose_config, fast_overrides
from pcamx import pipeline
from pcamx.runtime.tracking import Tracker


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged: list[dict] = []
        self.steps: list[int] = []
        self.summary: dict = {}
        self.finished = False

    def log(self, values, step=None):
        self.logged.append(values)
        if step is not None:
            self.steps.append(step)

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        run = FakeRun(**kwargs)
        module.runs.append(run)
        return run

    module.init = init
    module.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_disabled_by_config_or_environment(fake_wandb, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    Tracker({"enabled": False}, {}, tmp_path).log({"a": 1})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    Tracker({"enabled": True}, {}, tmp_path).log({"a": 1})
    assert fake_wandb.runs == []


def test_a_run_logs_config_curves_metrics_and_roc(fake_wandb, monkeypatch, small_pcam: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Training, then compression with healing: W&B drops any step lower than one it has seen.
    cfg = compose_config(*fast_overrides(small_pcam, "wandb.enabled=true", "wandb.project=pcamx-test",
                                         "train.epochs=2", "train.max_train_batches=0", "prune=mlp",
                                         "prune.heal_epochs=1"))
    pipeline.run(cfg, run_dir=tmp_path)
    (run,) = fake_wandb.runs
    assert run.init["project"] == "pcamx-test" and run.init["config"]["method"]["name"] == "head_only"
    keys = {k for values in run.logged for k in values}
    assert {"train/loss", "val/auroc"} <= keys and "test/roc" in keys
    assert run.summary["test/auroc"] > 0 and run.summary["data"] == "synthetic"
    assert run.finished
    assert run.steps == sorted(run.steps) and max(run.steps) > 16  # heal steps continue after training
