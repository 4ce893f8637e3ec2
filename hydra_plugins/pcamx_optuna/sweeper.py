"""Hydra sweeper on Optuna's ask/tell API (`hydra/sweeper=optuna`, Optuna >= 4; keys: config.py). Each batch of
n_jobs trials is asked, composed, launched as one launch() with job number = trial number, and told what the jobs
returned: FAIL with the reason for a job that raised, returned None (a failed pcamx run, a lost job) or no usable
value, PRUNED for one the pruner stopped. Rerunning with the same hydra.sweep.dir continues the study up to n_trials;
two sweeps must not run one study at once."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import re
import shlex
import sys
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pcamx.runtime import run_files, search
from pcamx.runtime.search import SearchConfigError

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

log = logging.getLogger(__name__)

FORMS = "interval(a, b), int(interval(a, b)), tag(log, interval(a, b)), range(start, stop[, step]), choice(a, b, ...)"
_parser = OverridesParser.create()


def search_space(lines: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Override lines (hydra.sweeper.params as key=value, then the command line's) → the distribution of each
    searched key, and the lines every trial gets as they are. The last mention of a key wins."""
    last: dict[tuple[str, str | None], Override] = {}
    for line in lines:
        try:
            override = _parser.parse_override(line)
        except HydraException as err:
            raise SearchConfigError(f"{line!r} does not parse ({err}); a searched key takes {FORMS}") from None
        last[override.key_or_group, override.package] = override
    dists = {o.get_key_element(): distribution(o) for o in last.values() if o.is_sweep_override()}
    return dists, [o.input_line for o in last.values() if not o.is_sweep_override()]


def distribution(override: Override) -> BaseDistribution:
    """interval → Float/IntDistribution, tag(log, ...) with log=True; range → a stepped one over exactly the values
    Hydra's range gives (stop excluded); choice(...) and a,b,... → CategoricalDistribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value, where = override.value(), f"hydra.sweeper.params.{override.input_line}"
    tags = set(getattr(value, "tags", None) or ())
    if tags - {"log"}:
        raise SearchConfigError(f"{where}: unknown tag(s) {sorted(tags - {'log'})}; the one tag is log")
    log_ = "log" in tags
    try:
        if override.is_interval_sweep():
            ints = isinstance(value.start, int) and isinstance(value.end, int)
            return (IntDistribution if ints else FloatDistribution)(value.start, value.end, log=log_)
        if override.is_range_sweep():
            if not (values := list(override.sweep_iterator())):
                raise ValueError("the range holds no value")
            low, step = min(values), abs(value.step)
            if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
                return IntDistribution(low, max(values), step=step, log=log_)
            # Hydra adds a float step up with rounding drift: the last value is low + k·step exactly.
            return FloatDistribution(low, round(low + step * (len(values) - 1), 12), step=step, log=log_)
        if override.is_choice_sweep() and not log_:
            # Optuna's choices are scalars: lists and dicts become their override text.
            return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    except ValueError as err:
        raise SearchConfigError(f"{where}: {err}") from None
    raise SearchConfigError(f"{where}: the optuna sweeper searches {FORMS} or a,b,...; tag(log, ...) goes on "
                            f"interval(...) and range(...)")


def override_value(value: Any) -> str:
    """A sampled value (or the study's name or storage) as override text that Hydra reads back as that value."""
    if not isinstance(value, str):
        return str(value)
    try:
        parsed = _parser.parse_override(f"k={value}").value()
    except HydraException:
        parsed = None
    # A list or dict choice is its override text already (see distribution). Else quoted: Hydra's escapes are
    # for quotes and the backslashes before one.
    if parsed == value or isinstance(parsed, list | dict):
        return value
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value) + "'"


def directions_of(direction: Any) -> list[str]:
    """hydra.sweeper.direction (a string or a list of them) as a list of minimize/maximize."""
    out = [str(d).lower() for d in (direction if isinstance(direction, list | tuple) else [direction])]
    if not out or any(d not in ("minimize", "maximize") for d in out):
        raise SearchConfigError(f"hydra.sweeper.direction={direction!r}: use minimize or maximize, or a list of "
                                f"them, one per objective")
    return out


def objective_values(returned: Any, directions: Sequence[str], objectives: Sequence[str] | None = None
                     ) -> list[float]:
    """The objective value(s) in what a job returned; ValueError with the reason otherwise."""
    if isinstance(returned, Mapping) != bool(objectives):
        raise ValueError(f"the job returned {returned!r:.80}: hydra.sweeper.objectives names the key(s) to optimize "
                         f"when (and only when) the job returns a mapping")
    returned = [_lookup(returned, key) for key in objectives] if objectives else returned
    # a sequence, or a number (numpy and torch scalars included)
    items = list(returned) if isinstance(returned, list | tuple) or getattr(returned, "ndim", 0) == 1 else [returned]
    if len(items) != len(directions):
        raise ValueError(f"the job returned {len(items)} value(s) ({returned!r:.80}) for the {len(directions)} "
                         f"direction(s) {list(directions)}")
    try:
        values = [float(i) for i in items if not isinstance(i, str | bytes | bool)]
    except (TypeError, ValueError):
        values = []
    if len(values) != len(items):
        raise ValueError(f"the job returned {returned!r:.80} where a number was due for each direction")
    if not all(map(math.isfinite, values)):
        raise ValueError(f"the job returned a non-finite objective value ({values})")
    return values


def _lookup(mapping: Mapping[str, Any], key: str) -> Any:
    try:
        return mapping[key] if key in mapping else functools.reduce(lambda node, k: node[k], key.split("."), mapping)
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"objective {key!r} (hydra.sweeper.objectives) is not in what the job returned (keys "
                         f"{sorted(map(str, mapping))[:12]})") from None


def outcome(ret: JobReturn, user_attrs: Mapping[str, Any], directions: Sequence[str],
            objectives: Sequence[str] | None, run_dir: str) -> tuple[Any, list[float] | None, str | None]:
    """The TrialState to tell for one job, and its values (COMPLETE) or why not (FAIL, PRUNED)."""
    from optuna import TrialPruned
    from optuna.trial import TrialState

    returned = ret._return_value  # .return_value re-raises a failed job's exception
    # A job the pruner stopped may end any way but with a value: the study knows the pruner said yes.
    if isinstance(returned, TrialPruned) or (search.PRUNED_AT in user_attrs and (
            ret.status != JobStatus.COMPLETED or returned is None)):
        step = user_attrs.get(search.PRUNED_AT)
        return TrialState.PRUNED, None, f"pruned at step {step}" if step is not None else "pruned"
    if ret.status != JobStatus.COMPLETED:  # FAILED: returned is the exception it raised
        return TrialState.FAIL, None, f"the job failed ({type(returned).__name__}: {str(returned)[:500]})"
    if returned is None:  # a pcamx run wrote why into its metrics.json (atomically)
        metrics = Path(run_dir) / run_files.METRICS
        error = metrics.is_file() and json.loads(metrics.read_text()).get("error")
        why = f": {str(error).strip().splitlines()[0][:500]}" if error else ""
        return TrialState.FAIL, None, f"the job returned None (a run that failed, or a lost job){why}"
    try:
        return TrialState.COMPLETE, objective_values(returned, directions, objectives), None
    except ValueError as err:
        return TrialState.FAIL, None, str(err)


def _fail_uncounted(study: optuna.Study, trial: Any, reason: str) -> None:
    """Tell FAIL a trial that never ran to its end; it does not count toward n_trials."""
    from optuna.trial import TrialState

    study._storage.set_trial_user_attr(trial._trial_id, search.UNCOUNTED, True)
    study._storage.set_trial_user_attr(trial._trial_id, search.REASON, " ".join(reason.split())[:500])
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any = None, direction: Any = "minimize", storage: str | None = None,
                 study_name: str | None = None, n_trials: int = 20, n_jobs: int = 2, max_failure_rate: float = 1.0,
                 params: Any = None, pruner: Any = None, objectives: Any = None, max_batch_size: int | None = None,
                 trial: int | None = None) -> None:
        def plain(node: Any) -> Any:  # _recursive_=False hands nested nodes over as configs
            return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

        self.sampler, self.pruner, self.direction = plain(sampler) or None, plain(pruner) or None, plain(direction)
        self.storage, self.study_name, self.n_trials, self.n_jobs = storage, study_name, n_trials, n_jobs
        self.max_failure_rate, self.max_batch_size = max_failure_rate, max_batch_size
        self.params: dict[str, Any] = plain(params) or {}
        self.objectives: list[str] | None = [str(k) for k in plain(objectives)] if objectives else None
        self.plots: dict[str, str] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def check(self) -> list[str]:
        """The directions, once every setting has been checked: one error naming the key otherwise."""
        directions = directions_of(self.direction)
        for key, ok, want in (
                ("n_trials", self.n_trials >= 0, "an integer >= 0"), ("n_jobs", self.n_jobs >= 1, "an integer >= 1"),
                ("max_batch_size", self.max_batch_size is None or self.max_batch_size >= 1, "null or an integer >= 1"),
                ("max_failure_rate", 0 <= self.max_failure_rate <= 1, "a share in [0, 1]"),
                ("objectives", len(self.objectives or directions) == len(directions), "one key per direction"),
                ("study_name", self.study_name or not self.storage, "a name with a storage that sweeps may share")):
            if not ok:
                raise SearchConfigError(f"hydra.sweeper.{key}={getattr(self, key)!r}: use {want}")
        if self.pruner:  # the jobs build it: fail here, before any runs
            search.build("pruner", self.pruner)
        return directions

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        self.directions = directions = self.check()
        lines = [f"{k}={'null' if v is None else v}" for k, v in self.params.items()]
        distributions, self.fixed = search_space([*lines, *arguments])
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir)).expanduser().absolute()
        self.storage_url = search.resolve_storage(self.storage, self.sweep_dir)
        self.name = self.study_name or str(self.config.hydra.job.name)
        study = optuna.create_study(storage=search.open_storage(self.storage_url), study_name=self.name,
                                    directions=directions, load_if_exists=True)
        if (have := [d.name.lower() for d in study.directions]) != directions:
            raise SearchConfigError(f"study {self.name!r} in {self.storage_url} has the direction(s) {have}, not "
                                    f"hydra.sweeper.direction={directions}: use a new hydra.sweep.dir or study_name")
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            log.warning("trial %d was left running by a sweep that stopped: FAIL, not counted", t.number)
            _fail_uncounted(study, t, "interrupted: its sweep stopped while it ran")
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state.is_finished() and not t.user_attrs.get(search.UNCOUNTED) for t in trials)
        if self.sampler:  # a new seed: a continued study must not redraw the points it has
            study.sampler = search.build("sampler", self.sampler, seed_offset=len(trials))
        batch = min(self.n_jobs, self.max_batch_size or self.n_jobs)
        log.info("Optuna study %r in %s: %s, %d trial(s) done, %d to go in batches of %d; searching %s", self.name,
                 self.storage_url, directions, done, max(self.n_trials - done, 0), batch, distributions)
        try:
            self._run(study, distributions, self.n_trials - done, batch)
        finally:
            self._write_results(study)
        self._write_plots(study, len(distributions))

    def _run(self, study: optuna.Study, distributions: dict[str, BaseDistribution], to_go: int, batch: int) -> None:
        while to_go > 0:
            try:
                trials = [study.ask(distributions) for _ in range(min(batch, to_go))]
            except ValueError as err:  # a key whose kind of distribution changed since the study began
                raise SearchConfigError(f"study {self.name!r} cannot sample the search space ({err}): use a new "
                                        f"hydra.sweep.dir or study_name for a changed search space") from None
            jobs = [[*self.fixed, *self._overrides(t.params), f"hydra.sweeper.trial={t.number}",
                     f"hydra.sweeper.study_name={override_value(self.name)}",
                     f"hydra.sweeper.storage={override_value(self.storage_url)}"] for t in trials]
            self._compose(study, trials, jobs)
            returns = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
            attrs = {t.number: t.user_attrs for t in study.get_trials(deepcopy=False)}  # what the jobs set
            failed = sum(self._tell(study, t, r, attrs[t.number]) for t, r in zip(trials, returns, strict=True))
            to_go -= len(trials)
            self._write_results(study)
            if study._stop_flag:
                log.info("the sampler has no more trials to give: the search ends here")
                return
            if failed / len(trials) > self.max_failure_rate:
                log.error("%d of %d trials of the batch failed, more than hydra.sweeper.max_failure_rate=%s: the "
                          "search stops", failed, len(trials), self.max_failure_rate)
                return

    def _overrides(self, params: Mapping[str, Any]) -> list[str]:
        return [f"{k}={override_value(v)}" for k, v in params.items()]

    def _compose(self, study: optuna.Study, trials: list[optuna.trial.Trial], jobs: list[list[str]]) -> None:
        """Each job's config composed before any runs, as Hydra's validate_batch_is_legal does: a key or value the
        config does not take, or a ??? that no override sets, is an error to fix, not failed trials."""
        try:
            for job in jobs:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, job)
                # interpolations stay unresolved: some need a running job
                OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                       throw_on_missing=True)
        except Exception as err:
            if isinstance(err, MissingMandatoryValue):
                err = SearchConfigError(f"mandatory value missing (???): {err.full_key}; every trial would fail. "
                                        f"Give it on the command line: {err.full_key}=...")
            for t in trials:
                _fail_uncounted(study, t, f"its config did not compose: {err}")
            raise err from None

    def _tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn, attrs: Mapping[str, Any]) -> bool:
        """Tell the study one job's outcome; True if it failed."""
        from optuna.trial import TrialState

        run_dir = str(ret.hydra_cfg and OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", default=None)
                      or self.sweep_dir / str(trial.number))  # no hydra_cfg: a job lost before it ran
        state, values, reason = outcome(ret, attrs, self.directions, self.objectives, run_dir)
        trial.set_user_attr("run_dir", run_dir)
        trial.set_user_attr(search.REASON, reason)
        log.log(logging.WARNING if state == TrialState.FAIL else logging.INFO, "trial %d %s: %s %s", trial.number,
                state.name, reason or values, trial.params)
        # A sampler that has exhausted its space (grid, brute force) calls study.stop() while told; Optuna
        # allows that inside optimize() only, so the sweeper stands in for it and stops at the flag.
        study._thread_local.in_optimize_loop = True
        try:
            study.tell(trial, values=values, state=state, skip_if_finished=True)
        finally:
            study._thread_local.in_optimize_loop = False
        return state == TrialState.FAIL

    def _write_results(self, study: optuna.Study) -> None:
        """optimization_results.yaml (the best trial or the Pareto front, each with a command line) and trials.csv."""
        import yaml
        from optuna.trial import TrialState

        from pcamx.runtime import disk

        trials = study.get_trials(deepcopy=False)
        results: dict[str, Any] = {"name": "optuna", "study_name": self.name, "storage": self.storage_url,
                                   "directions": self.directions, "objectives": self.objectives,
                                   "trials": dict(Counter(t.state.name for t in trials))}
        if len(self.directions) > 1:
            results["best_trials"] = [{"number": t.number, "params": t.params, "values": t.values,
                                       "run_dir": self._run_dir(t), "command": self._command(t)}
                                      for t in sorted(study.best_trials, key=lambda t: t.number)]
        elif any(t.state == TrialState.COMPLETE for t in trials):
            best = study.best_trial
            results |= {"best_params": best.params, "best_value": best.value, "best_trial": best.number,
                        "best_run_dir": self._run_dir(best), "best_command": self._command(best)}
        results["plots"] = self.plots
        # no line wrapping: a command line stays one line, to copy
        text = yaml.safe_dump(results, sort_keys=False, width=1 << 20)
        disk.write_text(self.sweep_dir / run_files.OPTUNA_RESULTS, text)
        names = list(dict.fromkeys(k for t in trials for k in t.params))  # an earlier search space's keys too
        values = ["value"] if len(self.directions) == 1 else [f"value_{i}" for i in range(len(self.directions))]
        csv.writer(out := io.StringIO(), lineterminator="\n").writerows([
            ["number", "state", *values, *names, "duration_s", "run_dir", "note"],
            *([t.number, t.state.name, *(t.values or [""] * len(values)), *(t.params.get(k, "") for k in names),
               round(t.duration.total_seconds(), 3) if t.duration else "", self._run_dir(t),
               t.user_attrs.get(search.REASON, "")] for t in trials)])
        disk.write_text(self.sweep_dir / run_files.TRIALS_CSV, out.getvalue())

    def _write_plots(self, study: optuna.Study, n_params: int) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a cluster node
        import matplotlib.pyplot as plt
        import optuna
        from optuna.visualization import matplotlib as vis

        from pcamx.runtime import disk

        n, done = len(self.directions), len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        names = self.objectives or [f"objective {i}" for i in range(n)]
        for name, wanted, draw in (
                ("optimization_history", n == 1 and done >= 1,
                 lambda: vis.plot_optimization_history(study, target_name=names[0])),
                ("param_importances", n == 1 and done >= 2 and n_params >= 2,
                 lambda: vis.plot_param_importances(study, target_name=names[0])),
                ("pareto_front", n == 2 and done >= 1, lambda: vis.plot_pareto_front(study, target_names=names))):
            if not wanted:
                continue
            try:  # Optuna's plots set a global style: the callbacks that draw after the sweep keep theirs
                with warnings.catch_warnings(), matplotlib.rc_context():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    figure = draw().figure
                    figure.tight_layout()
                    with disk.atomic_path(self.sweep_dir / f"{name}.png") as tmp:
                        figure.savefig(tmp, format="png", dpi=120)
                    plt.close(figure)
                self.plots[name] = f"{name}.png"
            except Exception as err:  # a figure is a convenience, never the reason a finished sweep fails
                log.warning("plot %s failed: %s", name, err)
                self.plots[name] = f"failed: {type(err).__name__}: {err}"
        self._write_results(study)

    def _run_dir(self, trial: optuna.trial.FrozenTrial) -> str:
        return str(trial.user_attrs.get("run_dir") or self.sweep_dir / str(trial.number))

    def _command(self, trial: optuna.trial.FrozenTrial) -> str:
        """The trial as one run: the overrides its job ran with (right for a trial of an earlier sweep of the study
        too) and hydra.mode=RUN (a search preset sets MULTIRUN)."""
        import yaml

        ran = Path(self._run_dir(trial)) / run_files.HYDRA_OVERRIDES
        words = yaml.safe_load(ran.read_text()) if ran.is_file() else [*self.fixed, *self._overrides(trial.params)]
        return shlex.join(["python", sys.argv[0] or "run.py", *words, "hydra.mode=RUN"])
