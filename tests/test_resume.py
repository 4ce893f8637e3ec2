"""An interrupted training run resumes from resume.pt and ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose_config, fast_overrides
from pcamx import pipeline
from pcamx.runtime import run_files
from pcamx.runtime.errors import ConfigError
from pcamx.training import loop as train


class Killed(BaseException):
    """Stands in for SIGKILL / Slurm preemption: not an Exception, so nothing downstream catches it."""


def overrides(root: Path, *extra: str) -> list[str]:
    return fast_overrides(root, "train.epochs=2", "train.checkpoint_every=3", "train.val_every=0.5", *extra)


@pytest.mark.parametrize("method", ["lora", "fullft"])
def test_resume_after_kill_reproduces_uninterrupted_metrics(small_pcam: Path, tmp_path: Path, monkeypatch,
                                                            method: str) -> None:
    cfg = compose_config(*overrides(small_pcam, f"method={method}"))
    reference = pipeline.run(cfg, run_dir=tmp_path / "uninterrupted")
    assert not (tmp_path / "uninterrupted" / run_files.RESUME).exists()  # cleaned up after a finished run

    # Kill at step 5 of 8: after the step-3 checkpoint, mid-epoch (4 steps per epoch).
    original = train.warmup_cosine

    def dying(step: int, *args) -> float:
        if step == 5:
            raise Killed
        return original(step, *args)

    monkeypatch.setattr(train, "warmup_cosine", dying)
    with pytest.raises(Killed):
        pipeline.run(cfg, run_dir=tmp_path / "killed")
    assert (tmp_path / "killed" / run_files.RESUME).is_file()
    monkeypatch.setattr(train, "warmup_cosine", original)

    resumed = pipeline.run(compose_config(*overrides(small_pcam, f"method={method}", "resume=true")),
                           run_dir=tmp_path / "killed")
    assert resumed["train_steps"] == reference["train_steps"] == 8
    for key in ("auroc", "nll", "brier", "ece", "acc", "sens_at_95spec"):
        assert resumed[key] == reference[key], key
    assert resumed["val"] == reference["val"] and resumed["best_step"] == reference["best_step"]
    on_disk = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert on_disk["auroc"] == reference["auroc"]


def test_resume_true_without_state_says_where_it_looked(small_pcam: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resume=true but .*resume.pt does not exist"):
        pipeline.run(compose_config(*overrides(small_pcam, "resume=true")), run_dir=tmp_path)


def test_resume_false_ignores_an_old_state(small_pcam: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / run_files.RESUME).write_bytes(b"stale state from an earlier attempt")
    metrics = pipeline.run(compose_config(*overrides(small_pcam, "resume=false")), run_dir=tmp_path)
    assert metrics["train_steps"] == 8
