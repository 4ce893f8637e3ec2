"""The optuna sweeper (hydra_plugins/pcamx_optuna, `hydra/sweeper=optuna`) and the trial API of
pcamx.runtime.search, on a toy Hydra app in a temp dir (not pcamx's pipeline): what the jobs wrote into their
run dirs is the truth the study, trials.csv and optimization_results.yaml are checked against."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, compose_config

if str(REPO) not in sys.path:  # hydra_plugins.pcamx_optuna before pyproject's setuptools include names it
    sys.path.insert(0, str(REPO))

optuna = pytest.importorskip("optuna")

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402

from hydra_plugins.pcamx_optuna.sweeper import (  # noqa: E402
    OptunaSweeper,
    directions_of,
    objective_values,
    override_value,
    search_space,
)
from pcamx.evaluation.metrics import METRIC_ALIASES, SELECT_METRICS  # noqa: E402
from pcamx.runtime import run_files, search  # noqa: E402
from pcamx.runtime.search import SearchConfigError  # noqa: E402

# The toy task: its objective from x and y, a record of what it ran in its run dir, and per job number
# (`behaviour` in the config) a way to end: raise, return None / NaN / too many values, report intermediate
# values and stop when pruned, or be killed.
APP = '''
import json, os, signal
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig

from pcamx.runtime.search import current_trial


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    num = hc.job.num
    how = (cfg.behaviour or {}).get(f"j{num}", "ok")
    value = (cfg.x - 0.3) ** 2 + 0.1 * cfg.y
    record = {"num": num, "trial": hc.sweeper.get("trial"), "x": cfg.x, "y": cfg.y, "how": how,
              "in_trial": current_trial() is not None}
    write = lambda: (out / "record.json").write_text(json.dumps(record))
    if cfg.returns == "pareto":
        value = {"val": {"auroc": cfg.x}, "gflops": (cfg.x - 0.2) ** 2 + cfg.y}
    trial = current_trial()
    if how in ("bad", "bad_none") or cfg.report:
        for step in range(4):
            record["step"] = step
            trial.report(100.0 + step if how.startswith("bad") else value + 1.0 / (step + 1), step)
            if trial.should_prune():
                record["pruned"] = True
                write()
                if how == "bad_none":
                    return None  # what a pipeline that records its exceptions returns
                raise optuna.TrialPruned()
    record["value"] = value
    write()
    if how == "raise":
        raise RuntimeError(f"job {num} fails on purpose")
    if how == "none":  # as a pcamx run in a sweep does: record the failure, return None
        error = f"ValueError: job {num} recorded its failure\\nTraceback (most recent call last): ..."
        (out / "metrics.json").write_text(json.dumps({"status": "failed", "error": error}))
        return None
    if how == "nonfinite":
        return float("nan")
    if how == "two":
        return [value, value]
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"val": {"nll": value}} if cfg.returns == "val" else value


if __name__ == "__main__":
    main()
'''


ONE_PARAM = {"x": "interval(-1.0, 1.0)"}  # one searched key: no importance plot to compute


def make_app(root: Path, sweeper: dict, launcher: dict | None = None) -> Path:
    """The toy app in `root`; `sweeper` is added to (and replaces keys of) its hydra.sweeper settings."""
    (root / "conf").mkdir(parents=True)
    (root / "app.py").write_text(APP)
    defaults: list = [{"override hydra/sweeper": "optuna"}, "_self_"]
    hydra: dict = {
        "sweep": {"dir": str(root / "sweep"), "subdir": "${hydra.job.num}"},
        "sweeper": {"n_jobs": 2, "sampler": {"seed": 7},
                    "params": {"x": "interval(-1.0, 1.0)", "y": "choice(1, 2, 3)"}, **sweeper},
    }
    if launcher is not None:
        defaults.insert(1, {"override hydra/launcher": "submitit_local"})
        hydra["launcher"] = launcher
    config = {"defaults": defaults, "x": 0.0, "y": 1, "returns": "float", "select_metric": "nll", "report": False,
              "behaviour": None, "hydra": hydra}
    (root / "conf" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def run_app(root: Path, *overrides: str, multirun: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "app.py", *(["-m"] if multirun else []), *overrides], cwd=root, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def records(sweep: Path) -> dict[int, dict]:
    """What each job wrote, by job number (= run dir name)."""
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("[0-9]*/record.json")}


def trials_csv(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def results(sweep: Path) -> dict:
    return yaml.safe_load((sweep / "optimization_results.yaml").read_text())


def load_study(sweep: Path, name: str = "app") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=search.open_storage(str(sweep / run_files.OPTUNA_JOURNAL)))


def no_temp_files(sweep: Path) -> bool:
    return not list(sweep.glob(".*.tmp"))


# ---------------------------------------------------------------- unit: the search space and return values


def test_params_grammar_maps_to_optuna_distributions():
    dists, fixed = search_space([
        "lr=tag(log, interval(1e-5, 1e-2))",
        "wd=interval(0, 0.1)",
        "r=int(interval(4, 32))",
        "heal=range(1, 4)",           # Hydra's range excludes the stop: 1, 2, 3
        "tau=range(0.5, 1.0, 0.125)",  # 0.5, 0.625, 0.75, 0.875
        "every=range(2, 11, 3)",       # 2, 5, 8
        "method=choice(lora, fullft)",
        "opt=adam,sgd",
        "+extra=3",
        "data=synthetic",
        "ls=interval(0, 0.2)",
        "ls=0.1",                      # a later plain value of a searched key wins: not searched
    ])
    assert dists == {
        "lr": FloatDistribution(1e-5, 1e-2, log=True),
        "wd": FloatDistribution(0.0, 0.1),
        "r": IntDistribution(4, 32),
        "heal": IntDistribution(1, 3),
        "tau": FloatDistribution(0.5, 0.875, step=0.125),
        "every": IntDistribution(2, 8, step=3),
        "method": CategoricalDistribution(["lora", "fullft"]),
        "opt": CategoricalDistribution(["adam", "sgd"]),
    }
    assert fixed == ["+extra=3", "data=synthetic", "ls=0.1"]
    # int interval in log space, and the order of a later mention
    dists, _ = search_space(["n=tag(log, int(interval(1, 64)))"])
    assert dists["n"] == IntDistribution(1, 64, log=True)


@pytest.mark.parametrize(("line", "words"), [
    ("lr=interval(1e-5", ["lr=interval(1e-5", "interval(a, b)"]),
    ("lr=tag(loq, interval(1e-5, 1e-2))", ["lr", "loq", "log"]),
    ("lr=tag(log, interval(0, 1))", ["lr", "log"]),           # log needs low > 0
    ("lr=interval(1, 0)", ["lr"]),                            # low > high
    ("heal=range(3, 3)", ["heal", "no value"]),
    ("m=tag(log, choice(a, b))", ["m", "interval"]),
])
def test_bad_search_expressions_name_the_key(line, words):
    with pytest.raises(ValueError) as err:
        search_space([line])
    for word in words:
        assert word in str(err.value)


def test_directions_and_override_values():
    assert directions_of("Maximize") == ["maximize"]
    assert directions_of(["maximize", "minimize"]) == ["maximize", "minimize"]
    with pytest.raises(ValueError, match="minimize or maximize"):
        directions_of("maximise")
    # every value a distribution can give, written as an override, reads back as the value it stands for
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    line = "k=choice(4, 'a b', true, 'x=y', \"it's\", 1e-5, [1, 2], {a: 1}, 'null', '4', 'a,b', 2.5e10, -3)"
    dists, _ = search_space([line])
    meant = list(parser.parse_override(line).sweep_iterator())
    assert [parser.parse_override(f"k={override_value(c)}").value() for c in dists["k"].choices] == meant
    for value in [1e-5, 0.1, -3, 2.5e10, 7]:  # interval and range values
        assert parser.parse_override(f"k={override_value(value)}").value() == value
    # the storage and study name the jobs are given
    for text in ["/a/b-c_d.e/optuna.journal", "postgresql://u:p@h/db?sslmode=require", "a,b", "it's", "C:\\d\\x",
                 "end\\", "it\\'s"]:
        assert parser.parse_override(f"k={override_value(text)}").value() == text, text


@pytest.mark.parametrize(("settings", "key"), [
    ({"n_trials": -1}, "n_trials"),
    ({"n_jobs": 0}, "n_jobs"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_failure_rate": 1.5}, "max_failure_rate"),
    ({"direction": ["maximize", "minimize"], "objectives": ["val.auroc"]}, "objectives"),
    ({"direction": "maximise"}, "direction"),
    ({"storage": "sqlite:///x.db"}, "study_name"),
    ({"pruner": {"_target_": "optuna.samplers.TPESampler"}}, "pruner"),
    ({"pruner": {"_target_": "optuna.pruners.NoSuchPruner"}}, "pruner"),
    ({"pruner": {"_target_": "optuna.pruners.MedianPruner", "n_warmup": 2}}, "pruner"),
])
def test_bad_sweeper_settings_name_the_key(settings, key):
    with pytest.raises(SearchConfigError, match=f"hydra.sweeper.{key}") as err:
        OptunaSweeper(**settings).check()
    assert "\n" not in str(err.value)


def test_sampler_is_built_with_a_shifted_seed():
    sampler = search.build("sampler", {"_target_": "optuna.samplers.RandomSampler", "seed": 7}, seed_offset=3)
    assert isinstance(sampler, optuna.samplers.RandomSampler)
    assert sampler._rng.rng.random() == optuna.samplers.RandomSampler(seed=10)._rng.rng.random()
    with pytest.raises(SearchConfigError, match="hydra.sweeper.sampler"):
        search.build("sampler", {"_target_": "optuna.pruners.MedianPruner"})


def test_objective_resolvers_follow_the_selection_metric():
    assert OmegaConf.create({"m": "sens95", "o": "${pcamx.objective:${m}}", "d": "${pcamx.direction:${m}}"}) == {
        "m": "sens95", "o": "val.sens_at_95spec", "d": "maximize"}
    for metric, direction in SELECT_METRICS.items():
        key, sense = search.objective(metric)
        assert key == f"val.{METRIC_ALIASES.get(metric, metric)}"
        assert sense == {"max": "maximize", "min": "minimize"}[direction]
    assert search.objective("val_loss") == ("val.val_loss", "minimize")
    assert search.objective("nll") == ("val.nll", "minimize") and search.objective("auroc") == ("val.auroc", "maximize")
    with pytest.raises(ValueError, match="auroc"):
        search.objective("test_auroc")


def test_objective_values():
    import numpy as np

    assert objective_values(0.5, ["minimize"]) == [0.5]
    assert objective_values(np.float32(0.25), ["minimize"]) == [0.25]  # a metric as numpy computes it
    assert objective_values(np.array([0.5, 2.0]), ["maximize", "minimize"]) == [0.5, 2.0]
    assert objective_values((1, 2.5), ["maximize", "minimize"]) == [1.0, 2.5]
    metrics = {"val": {"auroc": 0.9}, "gflops": 1.5, "val/acc": 0.8}
    assert objective_values(metrics, ["maximize", "minimize"], ["val.auroc", "gflops"]) == [0.9, 1.5]
    assert objective_values(metrics, ["maximize"], ["val/acc"]) == [0.8]
    for returned, directions, objectives, words in [
        ([1.0, 2.0], ["minimize"], None, ["2 value(s)", "1"]),
        (1.0, ["maximize", "minimize"], None, ["1 value(s)", "2"]),
        (float("inf"), ["minimize"], None, ["non-finite"]),
        ("0.5", ["minimize"], None, ["number"]),
        (metrics, ["maximize"], None, ["hydra.sweeper.objectives"]),
        (metrics, ["maximize"], ["val.loss"], ["val.loss", "not in"]),
    ]:
        with pytest.raises(ValueError) as err:
            objective_values(returned, directions, objectives)
        for word in words:
            assert word in str(err.value)


def test_no_trial_outside_an_optuna_sweep():
    assert search.current_trial() is None


def test_storage_resolution(tmp_path):
    assert search.resolve_storage(None, tmp_path / "s") == str(tmp_path / "s" / "optuna.journal")
    assert search.resolve_storage("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    assert Path(search.resolve_storage("rel/j.journal", tmp_path)).is_absolute()


# ---------------------------------------------------------------- the sweeper, end to end


def test_study_continues_to_n_trials_in_total(tmp_path):
    root = make_app(tmp_path, {"n_trials": 3, "direction": "minimize", "params": ONE_PARAM})
    sweep = root / "sweep"
    run_app(root)
    first = records(sweep)
    assert sorted(first) == [0, 1, 2]
    stamps = {n: (sweep / str(n) / "record.json").stat().st_mtime_ns for n in first}
    # a sweep killed while trial 3 ran leaves it RUNNING: the next one fails it and does not count it
    load_study(sweep).ask({"x": FloatDistribution(-1.0, 1.0)})

    run_app(root, "hydra.sweeper.n_trials=5", "y=3")  # y=3: for the new trials only
    jobs = records(sweep)
    assert sorted(jobs) == [0, 1, 2, 4, 5]
    # the earlier jobs did not run again; each job ran as the trial of its own number
    assert {n: (sweep / str(n) / "record.json").stat().st_mtime_ns for n in first} == stamps
    assert all(r["trial"] == n and r["in_trial"] for n, r in jobs.items())

    study = load_study(sweep)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["FAIL"] + ["COMPLETE"] * 2
    assert study.trials[3].user_attrs[search.UNCOUNTED] is True
    assert "interrupted" in study.trials[3].user_attrs[search.REASON]
    for n, job in jobs.items():  # the study holds what each job computed from the values it was given
        assert study.trials[n].params == {"x": job["x"]}
        assert study.trials[n].value == pytest.approx(job["value"])
    # the continued study drew new points, not the seeded sampler's first ones again
    assert {t.params["x"] for t in study.trials[4:]}.isdisjoint({t.params["x"] for t in study.trials[:3]})

    rows = trials_csv(sweep)
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["run_dir"] for r in rows] == [str(sweep / str(n)) for n in range(6)]
    assert "interrupted" in rows[3]["note"] and rows[3]["value"] == ""
    best = min(jobs, key=lambda n: jobs[n]["value"])
    res = results(sweep)
    assert res["trials"] == {"COMPLETE": 5, "FAIL": 1}
    assert res["best_value"] == pytest.approx(min(r["value"] for r in jobs.values()))
    assert res["best_trial"] == best
    assert res["best_params"] == {"x": jobs[best]["x"]}
    assert res["best_run_dir"] == str(sweep / str(best))
    # the best trial's command is what its job ran with, in whichever sweep of the study it ran
    ran_with = [*(["y=3"] if best > 3 else []), f"x={jobs[best]['x']!r}"]
    assert shlex.split(res["best_command"]) == ["python", "app.py", *ran_with, "hydra.mode=RUN"]
    # one searched key: no importances to compare
    assert res["plots"] == {"optimization_history": "optimization_history.png"}
    assert (sweep / "optimization_history.png").read_bytes().startswith(b"\x89PNG")
    assert not (sweep / "param_importances.png").exists()
    assert no_temp_files(sweep)


def test_a_sampler_that_runs_out_of_points_ends_the_search(tmp_path):
    # A grid or brute-force sampler stops the study when its space is done (Optuna allows that in optimize() only).
    root = make_app(tmp_path, {"sampler": {"_target_": "optuna.samplers.BruteForceSampler"}, "n_trials": 10,
                               "n_jobs": 1, "params": {"y": "choice(1, 2, 3)"}})
    run_app(root)
    rows = trials_csv(root / "sweep")
    assert sorted(int(r["y"]) for r in rows) == [1, 2, 3] and {r["state"] for r in rows} == {"COMPLETE"}


def test_failed_jobs_are_recorded_and_the_search_goes_on_up_to_max_failure_rate(tmp_path):
    # batches of 3: two failures (a share of exactly 2/3) go on, three (the third batch) stop the search
    root = make_app(tmp_path, {"n_trials": 12, "n_jobs": 3, "direction": "minimize", "max_failure_rate": 2 / 3})
    sweep = root / "sweep"
    run_app(root, "behaviour={j1:raise,j2:none,j3:nonfinite,j4:two,j6:raise,j7:raise,j8:raise}")
    jobs = records(sweep)
    assert sorted(jobs) == list(range(9))
    rows = {int(r["number"]): r for r in trials_csv(sweep)}
    assert {n: r["state"] for n, r in rows.items()} == {
        0: "COMPLETE", 1: "FAIL", 2: "FAIL", 3: "FAIL", 4: "FAIL", 5: "COMPLETE", 6: "FAIL", 7: "FAIL", 8: "FAIL"}
    assert "RuntimeError" in rows[1]["note"] and "fails on purpose" in rows[1]["note"]
    assert "None" in rows[2]["note"] and rows[2]["note"].endswith(": ValueError: job 2 recorded its failure")
    assert "non-finite" in rows[3]["note"]
    assert "2 value(s)" in rows[4]["note"]
    res = results(sweep)
    assert res["trials"] == {"COMPLETE": 2, "FAIL": 7}
    assert res["best_value"] == pytest.approx(min(jobs[0]["value"], jobs[5]["value"]))
    # two completed trials over two searched keys: importances can be computed
    assert res["plots"] == {"optimization_history": "optimization_history.png",
                            "param_importances": "param_importances.png"}
    for png in res["plots"].values():
        assert (sweep / png).read_bytes().startswith(b"\x89PNG")
    assert no_temp_files(sweep)


def test_two_objectives_give_the_pareto_front(tmp_path):
    root = make_app(tmp_path, {"n_trials": 8, "n_jobs": 4, "direction": ["maximize", "minimize"],
                               "objectives": ["val.auroc", "gflops"],
                               "sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 7}})
    sweep = root / "sweep"
    run_app(root, "returns=pareto")
    jobs = records(sweep)
    assert sorted(jobs) == list(range(8))
    # by hand: (maximize val.auroc, minimize gflops); a point is dominated if another is no worse in both
    # and better in one
    points = {n: (r["value"]["val"]["auroc"], r["value"]["gflops"]) for n, r in jobs.items()}
    front = {n for n, (a, g) in points.items()
             if not any(a2 >= a and g2 <= g and (a2 > a or g2 < g) for m, (a2, g2) in points.items() if m != n)}
    res = results(sweep)
    assert {t["number"] for t in res["best_trials"]} == front
    for t in res["best_trials"]:
        assert t["values"] == pytest.approx(list(points[t["number"]]))
        assert t["params"] == {"x": jobs[t["number"]]["x"], "y": jobs[t["number"]]["y"]}
    assert "best_value" not in res
    assert res["plots"] == {"pareto_front": "pareto_front.png"}
    assert (sweep / "pareto_front.png").read_bytes().startswith(b"\x89PNG")
    header = trials_csv(sweep)[0].keys()
    assert {"value_0", "value_1", "x", "y"} <= set(header)


def test_pruner_stops_a_bad_trial(tmp_path):
    # trials 0-2 report decreasing values; 3 reports 100+ from its first step and raises TrialPruned; 4 does too
    # but returns None, as a pipeline that records every exception does. The objective and its direction come
    # from the presets' resolvers: select_metric nll → val.nll of the returned metrics, minimized.
    root = make_app(tmp_path, {"n_trials": 5, "n_jobs": 1, "direction": "${pcamx.direction:${select_metric}}",
                               "objectives": ["${pcamx.objective:${select_metric}}"], "pruner": {
        "_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 0}, "params": ONE_PARAM})
    sweep = root / "sweep"
    run_app(root, "report=true", "returns=val", "behaviour={j3:bad,j4:bad_none}")
    jobs = records(sweep)
    study = load_study(sweep)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    for n in (0, 1, 2):
        assert study.trials[n].value == pytest.approx(jobs[n]["value"])
    for n in (3, 4):  # stopped at the first step they reported
        assert jobs[n]["pruned"] and jobs[n]["step"] == 0 and "value" not in jobs[n]
        assert study.trials[n].intermediate_values == {0: 100.0}
    for n in (0, 1, 2):
        assert sorted(study.trials[n].intermediate_values) == [0, 1, 2, 3]
    rows = trials_csv(sweep)
    assert rows[3]["note"] == rows[4]["note"] == "pruned at step 0"


def test_missing_mandatory_value_fails_before_any_trial(tmp_path):
    # w is made mandatory by a plain ??? in the params (a preset's way to require a key on the command line)
    root = make_app(tmp_path, {"n_trials": 2, "params": {**ONE_PARAM, "w": "???"}})
    config = root / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("y: 1\n", "y: 1\nw: 0\n", 1))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "app.py", "-m"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "mandatory value missing (???): w" in out.stderr and "command line: w=..." in out.stderr
    assert not records(root / "sweep")
    # the trials asked for the batch failed without running: not counted toward n_trials by the next sweep
    trials = load_study(root / "sweep").trials
    assert [(t.state.name, t.user_attrs[search.UNCOUNTED]) for t in trials] == [("FAIL", True), ("FAIL", True)]
    assert "mandatory value missing" in trials[0].user_attrs[search.REASON]


@pytest.mark.slow
def test_submitit_local_launcher_runs_trials_in_parallel_and_reports_lost_jobs(tmp_path):
    """Through pcamx's reporting submitit launcher: job 1 is killed (no result comes back: a FAIL), job 2
    prunes itself after reporting."""
    root = make_app(tmp_path, {"n_trials": 4, "n_jobs": 2, "pruner": {
        "_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1}}, launcher={
        "_target_": "hydra_plugins.pcamx_launcher.reporting.ReportingLocalLauncher", "timeout_min": 5,
        "submitit_folder": "${hydra.sweep.dir}/.submitit/%j"})
    sweep = root / "sweep"
    run_app(root, "behaviour={j1:kill,j3:bad}", "report=true", timeout=300)
    study = load_study(sweep)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    states = [t.state.name for t in study.trials]
    assert states[1] == "FAIL" and states[3] == "PRUNED" and states[0] == states[2] == "COMPLETE"
    assert "None" in study.trials[1].user_attrs[search.REASON]
    assert all(math.isfinite(t.value) for t in study.trials if t.state.name == "COMPLETE")


# ---------------------------------------------------------------- the presets (conf/hparams_search)


def _preset(name: str) -> str:
    """The preset override: `hparams_search=` once conf/config.yaml lists the group, `+hparams_search=` until."""
    listed = any(isinstance(d, dict) and "hparams_search" in d
                 for d in yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["defaults"])
    return f"{'' if listed else '+'}hparams_search={name}"


def _ends(dist) -> list:
    """The extreme values of a distribution: what each searched key of a preset must accept."""
    if isinstance(dist, CategoricalDistribution):
        return [dist.choices[0], dist.choices[-1]]
    return [dist.low, dist.high]


@pytest.mark.parametrize(("preset", "objectives", "direction"), [
    ("demo", ["val.auroc"], "maximize"),
    ("lora", ["val.auroc"], "maximize"),
    ("fullft", ["val.auroc"], "maximize"),
    ("compress", ["val_final.auroc", "gflops"], ["maximize", "minimize"]),
])
def test_presets_search_keys_the_run_config_has(preset, objectives, direction):
    cfg = compose_config(_preset(preset), hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.pcamx_optuna.sweeper.OptunaSweeper"
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert OmegaConf.to_container(sweeper, resolve=True)["objectives"] == objectives
    assert OmegaConf.to_container(sweeper, resolve=True)["direction"] == direction
    # a search exits 1 when a trial failed (not when one was pruned), as every multirun does
    assert cfg.hydra.callbacks.sweep_summary.exit_on_failure is True
    # compress requires checkpoint= on the command line: a plain ??? in its params
    lines = [f"{k}={v}" for k, v in OmegaConf.to_container(sweeper.params).items() if v != "???"]
    dists, fixed = search_space(lines)
    assert dists and not fixed
    for end in (0, 1):  # both ends of every searched range compose with the typed schema, where the keys are
        values = {k: _ends(d)[end] for k, d in dists.items()}
        composed = compose_config(_preset(preset), *(f"{k}={override_value(v)}" for k, v in values.items()))
        for key, value in values.items():
            assert OmegaConf.select(composed, key) == value, key


def test_search_objective_follows_the_selection_metric():
    sweeper = compose_config(_preset("lora"), "train.select_metric=val_loss", hydra_config=True).hydra.sweeper
    assert (list(sweeper.objectives), sweeper.direction) == (["val.val_loss"], "minimize")
    sweeper = compose_config(_preset("fullft"), "train.select_metric=sens95", hydra_config=True).hydra.sweeper
    assert (list(sweeper.objectives), sweeper.direction) == (["val.sens_at_95spec"], "maximize")
