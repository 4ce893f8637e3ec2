"""Hyperparameter search (`hydra/sweeper=optuna`, hydra_plugins/pcamx_optuna): the trial API, what the sweeper and
its jobs share, the presets' resolvers. A training loop reports to its trial (Optuna is imported only then):

    if (trial := current_trial()) is not None:  # None outside an optuna sweep
        trial.report(val_auroc, step=validation_round)  # in the sense of the study's direction
        if trial.should_prune():  # always False in a multi-objective study: Optuna cannot prune those
            raise optuna.TrialPruned()  # or any failure: the sweeper tells PRUNED however the job ends
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from pcamx.runtime import run_files
from pcamx.runtime.errors import one_line

if TYPE_CHECKING:
    import optuna

PRUNED_AT = "pruned_at_step"  # user attributes of a trial: should_prune() said yes after this step
REASON = "reason"  # why a trial was told FAIL or PRUNED
UNCOUNTED = "uncounted"  # told FAIL without having run to its end (killed sweep, bad config): not in n_trials


class SearchConfigError(CompactHydraException, ValueError):
    """A hydra.sweeper setting that cannot work; Hydra prints the message alone."""


def objective(metric: Any) -> tuple[str, str]:
    """A train.select_metric value (aliases included) → the key in metrics.json of the best checkpoint's validation
    value (auroc → val.auroc, sens95 → val.sens_at_95spec, val_loss → val.val_loss) and the study direction."""
    from pcamx.evaluation.metrics import METRIC_ALIASES, SELECT_METRICS

    if (name := str(metric)) not in SELECT_METRICS:
        raise ValueError(f"{metric!r} is not a train.select_metric; choose one of {sorted(SELECT_METRICS)}")
    return f"val.{METRIC_ALIASES.get(name, name)}", {"max": "maximize", "min": "minimize"}[SELECT_METRICS[name]]


OmegaConf.register_new_resolver("pcamx.objective", lambda metric: objective(metric)[0], replace=True)
OmegaConf.register_new_resolver("pcamx.direction", lambda metric: objective(metric)[1], replace=True)


def resolve_storage(storage: str | None, sweep_dir: str | Path) -> str:
    """A database URL as given; a journal file (null: the sweep dir's) as an absolute path, as every job needs it."""
    if not storage:
        return str(Path(sweep_dir).expanduser().absolute() / run_files.OPTUNA_JOURNAL)
    return storage if "://" in storage else str(Path(storage).expanduser().absolute())


def open_storage(storage: str) -> optuna.storages.BaseStorage | str:
    """What optuna.create_study/load_study take for a resolved storage."""
    if "://" in storage:
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))  # its default lock (a symlink) is safe on NFS


def build(key: str, node: Any, seed_offset: int = 0) -> Any:
    """hydra.sweeper.<key> (sampler or pruner: a `_target_` mapping) built, or one error naming the key."""
    import optuna
    from hydra.utils import instantiate

    node = {**node, **({"seed": node["seed"] + seed_offset} if node.get("seed") is not None else {})}
    try:
        built = instantiate(node)
    except Exception as err:  # an import or argument error of the target
        raise SearchConfigError(f"hydra.sweeper.{key}: {one_line(err)}") from None
    if not isinstance(built, optuna.samplers.BaseSampler if key == "sampler" else optuna.pruners.BasePruner):
        raise SearchConfigError(f"hydra.sweeper.{key}={node} is not an Optuna {key}: give `_target_: "
                                f"optuna.{key}s.<class>` and its arguments")
    return built


class Trial:
    """The trial a job of an optuna sweep runs: report intermediate values, ask whether to stop."""

    def __init__(self, study: optuna.Study, number: int) -> None:
        import optuna

        # Optuna addresses a trial by its storage id; the job knows its number.
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        self.number, self._trial, self._multi = number, optuna.trial.Trial(study, trial_id), len(study.directions) > 1
        self._step: int | None = None
        # A rerun of a killed sweep may have told the trial FAIL while this job trains on: nothing more is recorded.
        self._finished = contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError)

    def report(self, value: float, step: int) -> None:
        """The intermediate `value` at `step` (a validation round, from 0) for the pruner."""
        if not self._multi:
            with self._finished:
                self._trial.report(float(value), int(step))
                self._step = int(step)

    def should_prune(self) -> bool:
        """Whether the pruner says stop now; a yes is recorded, so the sweeper tells PRUNED however the job ends."""
        if self._multi or not self._trial.should_prune():
            return False
        with self._finished:
            self._trial.set_user_attr(PRUNED_AT, self._step)
        return True


def current_trial() -> Trial | None:
    """The trial this Hydra job runs in an optuna sweep; None outside one (a plain run, another sweeper)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or OmegaConf.select(HydraConfig.get(), "sweeper.trial") is None:
        return None
    sweeper = HydraConfig.get().sweeper  # the sweeper set trial, storage and study_name for its job
    return _trial(sweeper.storage, sweeper.study_name, sweeper.trial)


@functools.cache  # one per trial: a Trial remembers its last step
def _trial(storage: str, study_name: str, number: int) -> Trial:
    import optuna
    from hydra.core.hydra_config import HydraConfig

    pruner = OmegaConf.select(HydraConfig.get(), "sweeper.pruner")
    pruner = build("pruner", OmegaConf.to_container(pruner, resolve=True)) if pruner else optuna.pruners.NopPruner()
    # The sampler is the sweeper's: a trial only reports and asks the pruner.
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage), pruner=pruner,
                              sampler=optuna.samplers.RandomSampler())
    return Trial(study, number)
