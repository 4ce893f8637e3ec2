"""Hydra callback: at the end of a multirun, write the sweep table into the sweep directory.

Registered by conf/hydra/callbacks/sweep_summary.yaml. Hydra calls `on_multirun_end` only when the
sweeper returns, and Hydra's BasicSweeper raises once a batch holds a failed job, so a job must
record its failure in metrics.json and return normally for this callback to run and report it;
`sweep_reports_failures()` tells the task function when that is safe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pcamx.report.runs import RunRecord, any_failed
from pcamx.report.summary import summarize
from pcamx.report.sweep import csv_rows
from pcamx.runtime.tracking import Tracker

log = logging.getLogger("pcamx")


class SweepSummaryCallback(Callback):
    """Writes summary.csv, summary.md and the figures (roc, calibration, frontier) into `hydra.sweep.dir`
    after all jobs returned.

    exit_on_failure: end the process with status 1 after writing the tables when a run failed or is
        missing. Hydra ignores exceptions raised by callbacks (it only warns), so SystemExit, which it
        does not catch, is the one way a callback can make the command fail. Callbacks listed before
        this one in hydra.callbacks then get no on_multirun_end (Hydra calls them in reverse order).
    """

    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = exit_on_failure

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        runs, paths = summarize([sweep_dir], sweep_dir, ci=bool(OmegaConf.select(config, "report.ci", default=False)))
        text = paths["md"].read_text()
        print(f"\n{text}\nsweep summary: {', '.join(str(p) for p in paths.values())}")
        try:
            log_to_wandb(config, runs, paths, sweep_dir)
        except Exception as err:  # the tables are on disk; a W&B outage must not hide the exit status
            log.warning("could not log the sweep summary to W&B: %s", err)
        if self.exit_on_failure and any_failed(runs):
            bad = ", ".join(f"{r.job} ({r.status})" for r in runs if not r.ok)
            log.error("sweep finished with runs that are not ok: %s", bad)
            raise SystemExit(1)


def sweep_reports_failures(hydra_cfg: DictConfig | None = None) -> bool:
    """True inside a multirun job whose sweep ends with this callback failing the command.

    Only then may a job swallow its exception (after metrics.json says "failed"): the sweep goes on,
    the table gets written, and the exit status still says that something failed."""
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return False
        hydra_cfg = HydraConfig.get()
    if hydra_cfg.get("mode") != RunMode.MULTIRUN:
        return False
    for node in (hydra_cfg.get("callbacks") or {}).values():
        target = str(node.get("_target_", ""))
        if target.endswith(f"{__name__}.{SweepSummaryCallback.__name__}") and node.get("exit_on_failure", True):
            return True
    return False


def log_to_wandb(config: DictConfig, runs: Sequence[RunRecord], paths: dict[str, Path], sweep_dir: Path) -> bool:
    """Log the table and the ROC figure as one W&B run when `wandb.enabled` and WANDB_MODE allows it."""
    wandb_cfg = OmegaConf.to_container(config.get("wandb") or {}, resolve=True)
    if not wandb_cfg.get("enabled") or os.environ.get("WANDB_MODE") == "disabled":
        return False
    tracker = Tracker(wandb_cfg, {"sweep_dir": str(sweep_dir), "n_runs": len(runs)}, sweep_dir,
                      name=f"sweep-summary {sweep_dir.name}", group=wandb_cfg.get("group") or str(sweep_dir))
    if tracker.run is None:
        return False
    import wandb

    columns, rows = csv_rows(runs)
    tracker.log({"sweep/summary": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])})
    for name in ("roc", "frontier"):
        if paths.get(name):
            tracker.log_image(f"sweep/{name}", paths[name])
    tracker.summary({"sweep/n_runs": len(runs), "sweep/n_not_ok": sum(not r.ok for r in runs)})
    tracker.finish()
    return True
