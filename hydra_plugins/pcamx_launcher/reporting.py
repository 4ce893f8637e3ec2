"""Submitit launchers that report lost jobs instead of losing the sweep table (`hardware=a100`, `submitit_local`).

Hydra's submitit launchers collect results with `job.results()`, which raises for a job that ended without one
(SIGKILL, out of memory, `scancel`, node failure, out of requeues) and so ends the sweep before its table is
written. These collect every job: a lost one gets a metrics.json (`status: failed`, `reason: lost`, the job id and
its log) unless it wrote one, and counts as a failed row. (Hydra loads launchers from `hydra_plugins` only.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from pcamx.runtime import run_files

log = logging.getLogger(__name__)
POLL_S = 2.0  # between checks of the jobs' state
GONE_S = 15.0  # a job out of squeue this long without a result file has ended without one


class SacctQuieter(logging.Filter):
    """Without Slurm accounting every poll of submitit's job watcher logs a failed `sacct`; say it once.
    (Job states then come from the result files: nothing is lost.)"""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        self.count += 1
        if self.count > 1:
            return False
        record.msg, record.args = ("sacct failed (Slurm accounting is probably disabled); job states are read from "
                                   "the jobs' result files instead, and further sacct errors are not shown"), ()
        return True


class _Reporting(BaseSubmititLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        quieter = SacctQuieter()
        submitit_log = logging.getLogger("submitit")
        submitit_log.addFilter(quieter)
        try:
            return self._launch(job_overrides, initial_job_idx)
        finally:
            submitit_log.removeFilter(quieter)
            if quieter.count > 1:
                log.info(f"sacct failed {quieter.count} times while waiting for the jobs (no accounting)")

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
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

        left = self._wait(jobs)
        results = []
        for num, (job, overrides) in enumerate(zip(jobs, job_overrides, strict=True), start=initial_job_idx):
            try:
                if job.job_id in left:  # results() would wait for a result file that never comes
                    raise RuntimeError(f"job {job.job_id} left the Slurm queue without a result")
                results.append(job.results()[0])
            except Exception as err:  # the job ended without a result: record it, keep collecting
                results.append(self._lost(sweep_dir / str(num), list(overrides), job, err))
        return results

    def _wait(self, jobs: Sequence[Any]) -> set[str]:
        """Until every job is done. submitit knows a Slurm job ended from its result file or from sacct; a
        job cancelled or killed has no result file, and without accounting sacct knows nothing, so a job that
        has left the queue (squeue) and stays gone for GONE_S is done too; returns those jobs' ids."""
        gone_since: dict[str, float] = {}
        left: set[str] = set()
        pending = list(jobs)
        while pending:
            queued = self._queued([j.job_id for j in pending]) if self._EXECUTOR == "slurm" else None
            still = []
            for job in pending:
                if job.done():
                    continue
                if queued is not None and job.job_id not in queued:
                    first = gone_since.setdefault(job.job_id, time.time())
                    if time.time() - first >= GONE_S:
                        log.warning(f"job {job.job_id} left the Slurm queue without a result")
                        left.add(job.job_id)
                        continue
                else:
                    gone_since.pop(job.job_id, None)
                still.append(job)
            pending = still
            if pending:
                time.sleep(POLL_S)
        return left

    @staticmethod
    def _queued(job_ids: list[str]) -> set[str] | None:
        """The given jobs that squeue still lists (pending, running, requeued...); None if squeue failed."""
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode != 0:
            # squeue refuses ids it no longer knows ("Invalid job id"): they have all left the queue.
            return set() if "Invalid job id" in out.stderr else None
        listed = {line.strip() for line in out.stdout.splitlines() if line.strip()}
        # A pending array shows as <array>_[0-3]: count its tasks as queued.
        arrays = {i.split("_[")[0] for i in listed if "_[" in i}
        return {j for j in job_ids if j in listed or j.split("_")[0] in arrays}

    def _lost(self, run_dir: Path, overrides: list[str], job: Any, err: Exception) -> JobReturn:
        log.error(f"job {job.job_id} ({' '.join(overrides)}) ended without a result: {type(err).__name__}")
        (run_dir / run_files.HYDRA_DIR).mkdir(parents=True, exist_ok=True)
        if not (run_dir / run_files.HYDRA_OVERRIDES).is_file():
            OmegaConf.save(OmegaConf.create(overrides), run_dir / run_files.HYDRA_OVERRIDES)
        metrics = run_dir / run_files.METRICS
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
