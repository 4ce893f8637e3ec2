"""Submitit launchers that report lost jobs instead of losing the sweep table.

Hydra's submitit launchers collect results with `job.results()`, which raises for a job that ended without
one (killed with SIGKILL, out of memory, `scancel`, node failure, out of requeues); the exception ends the
sweep before the summary callback writes its table. These subclasses (`hardware=a100` and
`hardware=submitit_local` select them) collect every job: a lost one gets a metrics.json in its run
directory (`status: failed`, `reason: lost`, the job id and its log) unless it wrote one itself, and
counts as a failed row; the callback then writes summary.csv/summary.md/roc.png and exits non-zero.

This module lives in the `hydra_plugins` namespace because Hydra only instantiates launchers from there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class _Reporting(BaseSubmititLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        # Executor and job parameters exactly as hydra-submitit-launcher 1.2 builds them.
        params = self.params
        init_keys = {"max_num_timeout"}
        init_params: dict[str, Any] = {"folder": params["submitit_folder"]}
        init_params.update({f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k in init_keys})
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()
                                      if k not in init_keys | {"submitit_folder"}})

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        job_params = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params, strict=True))

        results = []
        for num, (job, overrides) in enumerate(zip(jobs, job_overrides, strict=True), start=initial_job_idx):
            try:
                results.append(job.results()[0])
            except Exception as err:  # the job ended without a result: record it, keep collecting
                results.append(self._lost(sweep_dir / str(num), list(overrides), job, err))
        return results

    def _lost(self, run_dir: Path, overrides: list[str], job: Any, err: Exception) -> JobReturn:
        log.error(f"job {job.job_id} ({' '.join(overrides)}) ended without a result: {type(err).__name__}")
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        if not (run_dir / ".hydra" / "overrides.yaml").is_file():
            OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
        metrics = run_dir / "metrics.json"
        if not metrics.is_file() or json.loads(metrics.read_text() or "{}").get("status") not in (
                "ok", "failed", "interrupted"):
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            metrics.write_text(json.dumps({
                "status": "failed", "reason": "lost",
                "error": f"job {job.job_id} ended without a result (killed, out of memory, cancelled or node "
                         f"failure): {first_line[:300]}; its log: {job.paths.stderr}",
                "run_dir": str(run_dir),
            }, indent=2) + "\n")
        # COMPLETED with no value: the sweep goes on to the summary callback, which fails the command.
        return JobReturn(overrides=overrides, working_dir=str(run_dir), status=JobStatus.COMPLETED,
                         _return_value=None)


class ReportingLocalLauncher(_Reporting):
    _EXECUTOR = "local"


class ReportingSlurmLauncher(_Reporting):
    _EXECUTOR = "slurm"
