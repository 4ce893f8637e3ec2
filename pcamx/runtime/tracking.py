"""Weights & Biases logging; a no-op unless `wandb.enabled=true`. The mode follows WANDB_MODE."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class Tracker:
    def __init__(self, wandb_cfg: Mapping[str, Any], config: dict, run_dir: Path, name: str | None = None,
                 group: str | None = None):
        self.run = None
        if not wandb_cfg.get("enabled") or os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=wandb_cfg.get("project", "pcamx"),
            entity=wandb_cfg.get("entity"),
            name=name or wandb_cfg.get("name"),
            group=group or wandb_cfg.get("group"),
            tags=list(wandb_cfg.get("tags") or []),
            config=config,
            dir=str(run_dir),
            reinit=True,
        )

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(dict(values), step=step)

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(values))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def hydra_names() -> dict[str, str]:
    """In a sweep: W&B group = the sweep directory, run name = the job's overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    name = hydra_cfg.job.override_dirname or hydra_cfg.job.name
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {"name": name}
    sweep = Path(hydra_cfg.sweep.dir)
    return {"name": name, "group": f"{sweep.parent.name}/{sweep.name}"}
