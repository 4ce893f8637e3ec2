"""The config of the optuna sweeper. Its keys are hydra-optuna-sweeper 1.3's (which pins optuna<3), so a search
space written for it runs unchanged; pruner, objectives, max_batch_size and trial are ours."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

# Group options (`hydra/sweeper/sampler=random`); more keys merge onto them (`hydra.sweeper.sampler.seed=1`).
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "nsgaii": "NSGAIISampler"}
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner", "hyperband": "HyperbandPruner",
           "successive_halving": "SuccessiveHalvingPruner"}


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.pcamx_optuna.sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds sampler and pruner: a continued study shifts the seed
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    # {_target_: optuna.samplers.TPESampler, seed: 1}; a continued study adds its trial count to the seed
    sampler: dict[str, Any] = field(default_factory=dict)
    direction: Any = "minimize"  # minimize | maximize, or a list of them: one per objective
    # null: <hydra.sweep.dir>/optuna.journal (no server, fine on NFS); a journal file path; a database URL.
    storage: str | None = None
    study_name: str | None = None  # null: the job name; required with a storage that other sweeps may share
    n_trials: int = 20  # the study's total: rerunning with the same hydra.sweep.dir continues up to it
    n_jobs: int = 2  # trials per batch: one launch of the launcher (Slurm: one job array)
    max_failure_rate: float = 1.0  # stop once a batch has a larger share of failed trials (1.0: never)
    # key: interval(a, b) | int(interval(a, b)) | tag(log, interval(a, b)) | range(start, stop[, step]) |
    # choice(a, b, ...) | a,b,... ; a plain value goes to every trial (??? : the command line must give it).
    params: dict[str, Any] | None = None
    # null: no pruning; a `_target_` node, e.g. {_target_: optuna.pruners.MedianPruner, n_warmup_steps: 2}.
    pruner: dict[str, Any] | None = None
    # Dotted keys of a returned mapping (pcamx's metrics), one per direction; null: the return value itself.
    objectives: list[str] | None = None
    max_batch_size: int | None = None  # the basic sweeper's key (hardware=submitit_local sets it)
    trial: int | None = None  # set by the sweeper for each job it launches (with storage and study_name)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="pcamx_optuna")
for group, options in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
    for name, cls in options.items():
        node = {"_target_": f"optuna.{group}s.{cls}", **({"seed": None} if group == "sampler" else {})}
        ConfigStore.instance().store(group=f"hydra/sweeper/{group}", name=name, node=node, provider="pcamx_optuna")
