"""Sweep tables: collect every run directory under some folders and compare them side by side.

A run directory is any folder holding `metrics.json` (written by every run, ok or failed) or
`.hydra/overrides.yaml` (written by Hydra before the job starts, so a job killed before it wrote
metrics.json still shows up, as "missing"). Hydra's multirun.yaml is deliberately not read: a Slurm
sweep whose launcher process died never gets one that matches what ran.

Outputs (see `write_summary`):
  summary.csv  one row per run, raw numbers only, each traceable through its run_dir column;
  summary.md   one row per run, or per group of runs that differ only in `seed` (mean ± sd, n); a compressed
               or quantized run shows its change against its own uncompressed f32 model (metrics.json's
               `reference.change_pct`), marked † where the paired 95% interval excludes 0; with `ci`, each
               metric with its 95% interval. Or the reference layout;
  roc.png      one ROC curve per ok run, labelled by the overrides that differ across the sweep;
  calibration.png  one reliability curve per ok run;
  frontier.png test AUROC against GFLOPs, one line per compression kind, the Pareto-optimal rows ringed
               (pcamx.report.frontier; written when an ok run has both numbers).

summary.md marks ◆ (and summary.csv's `pareto` says) the rows no other ok row beats in both test AUROC and GFLOPs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the table is written at the end of cluster sweeps
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from pcamx.evaluation.metrics import METRIC_NAMES  # noqa: E402
from pcamx.evaluation.uncertainty import excludes_zero  # noqa: E402
from pcamx.report.format import (  # noqa: E402
    VALUE_COLUMNS,
    format_cell,
    format_interval,
    format_mean_sd,
    is_number,
    quantization_label,
)
from pcamx.report.run_outputs import plot_reliability  # noqa: E402
from pcamx.runtime import (
    disk,  # noqa: E402
    run_files,  # noqa: E402
)

PRUNE_STEPS = ("heads", "mlp", "svd")  # method=all's chain when neither metrics.json nor the config names one
BUDGET_KEYS = ("target_ratio", "target_gflops", "target_params")
DEFAULT_CRITERION, DEFAULT_SCOPE = "weight", "layer"
# Describe the run; shown in the header when constant across the sweep, as columns when not. Resolution always
# has a column of its own (GFLOPs depend on it), and is in the header too when constant.
CONTEXT_KEYS = ("data", "model", "tta_views", "resolution", "n_test")
_OWN_COLUMN = {"resolution"}
# Overrides already shown by the Method / Quantization / Pruning/τ / Resolution columns or the context fields.
_DESCRIBED = re.compile(
    r"^(method|quant|quant\.mode|prune|prune\.method|prune\.(tau|criterion|scope|target_\w+)(\.\w+)?|prune\.tau_\w+"
    r"|data|model|data\.resolution|eval\.tta(_views)?|eval\.precision)$")
# Scalars of metrics.json that are not numbers to compare but are still worth a CSV column.
_SKIP_CSV = {"status", "error", "traceback", "run_dir", "prune", "reference", "val", "ci95", "calibration"}
# Each descriptive field: its metrics.json key, then the config key that says it for a run without metrics.
_FIELDS = {"method": "method.name", "model": "model.name", "data": "data.name", "quant": "quant.mode",
           "eval_precision": "eval.precision", "resolution": "data.resolution", "method_config": "method",
           "n_test": None}
SYNTHETIC_NOTE = "synthetic stand-in data — not PCam"
ERROR_WIDTH = 80


@dataclass
class RunRecord:
    """One run directory as found on disk; `status` is "ok", "failed", "interrupted" or "missing" (no
    metrics.json)."""

    run_dir: Path
    job: str  # the run dir relative to the folder it was found under: Hydra's job number in a sweep
    status: str
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # .hydra/config.yaml: describes failed runs too
    error: str | None = None
    sort_key: tuple = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def override_map(self) -> dict[str, str]:
        return {key.lstrip("+"): value for key, _, value in (o.partition("=") for o in self.overrides)}

    def get(self, name: str) -> Any:
        """A descriptive field: what metrics.json says (what actually ran), else what the config asked for."""
        if self.metrics.get(name) is not None:
            return self.metrics[name]
        return _select(self.config, _FIELDS[name]) if _FIELDS.get(name) else None

    method = property(lambda self: self.get("method"))
    model = property(lambda self: self.get("model"))
    data = property(lambda self: self.get("data"), doc="read from the data dir's marker when the run ran")
    quant = property(lambda self: self.get("quant"))
    eval_precision = property(lambda self: self.get("eval_precision"))
    resolution = property(lambda self: self.get("resolution"))
    method_config = property(lambda self: self.get("method_config") or {})
    n_test = property(lambda self: self.get("n_test"))

    @property
    def tta_views(self) -> int | None:
        """Test-time views averaged (1 = no TTA)."""
        if "tta_views" in self.metrics:
            return self.metrics["tta_views"]
        views = _select(self.config, "eval.tta_views")
        return None if views is None else (views if _select(self.config, "eval.tta") else 1)

    @property
    def quantization(self) -> str:
        """The Quantization column: what the weights are and the precision the row was evaluated at."""
        return quantization_label(self.quant, self.eval_precision)

    @property
    def prune(self) -> dict[str, Any]:
        """metrics.json's `prune` entry (what ran), else the config's `prune` node (what was asked); method
        "none" when not pruned, None when unknown. Read it through `prune_summary`: it has several forms."""
        return dict(self.metrics.get("prune") or self.config.get("prune") or {"method": None})

    @property
    def plan(self) -> PruneSummary:
        return prune_summary(self.prune)

    @property
    def compressed_model(self) -> bool:
        """Pruned (the architecture changed), not merely quantized."""
        return self.prune["method"] not in (None, "none")

    @property
    def change_pct(self) -> dict[str, float]:
        """Change of each number against the run's own uncompressed f32 model (compressed/quantized runs)."""
        return (self.metrics.get("reference") or {}).get("change_pct") or {}

    @property
    def ci95(self) -> dict[str, list[float]]:
        return self.metrics.get("ci95") or {}

    def significant(self, metric: str) -> bool:
        """Whether the paired 95% interval of the difference to the run's own reference excludes 0."""
        paired = (self.metrics.get("reference") or {}).get("paired") or {}
        return excludes_zero((paired.get(metric) or {}).get("ci95"))

    @property
    def seedless(self) -> tuple:
        """What identifies the run apart from its seed: runs that share it are repeats of one setting."""
        return tuple(sorted((k, v) for k, v in self.override_map.items() if k != "seed"))


def _select(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _natural_key(parts: Iterable[str]) -> tuple:
    # Job 10 after job 9: numeric path parts compare as numbers.
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _find_run_dirs(root: Path) -> list[Path]:
    if (root / run_files.METRICS).is_file() or (root / run_files.HYDRA_OVERRIDES).is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if run_files.METRICS in filenames or (here / run_files.HYDRA_OVERRIDES).is_file():
            found.append(here)
            dirnames.clear()  # a run's own subfolders (wandb, checkpoints) are not runs
        else:
            dirnames[:] = [d for d in dirnames if d != "wandb"]
    return found


def shorten(text: str, width: int = ERROR_WIDTH) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # a half-written or hand-edited file must not hide the other runs
        return None


def read_run(run_dir: Path, job: str) -> RunRecord:
    """The record of one run directory; never raises for a broken run, it becomes failed or missing."""
    overrides = _load_yaml(run_dir / run_files.HYDRA_OVERRIDES)
    config = _load_yaml(run_dir / run_files.HYDRA_CONFIG)
    record = RunRecord(run_dir=run_dir, job=job, status="missing",
                       overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
                       config=config if isinstance(config, dict) else {})
    path = run_dir / run_files.METRICS
    if not path.is_file():
        record.error = "no metrics.json (killed, timed out or still running)"
        return record
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        record.status, record.error = "failed", f"unreadable metrics.json: {err}"
        return record
    record.metrics = metrics if isinstance(metrics, dict) else {}
    status = record.metrics.get("status")
    record.status = status if status in ("ok", "interrupted") else "failed"
    if status == "interrupted":
        record.error = f"stopped by {record.metrics.get('signal')}: {record.metrics.get('resume')}"
    elif not record.ok:
        record.error = str(record.metrics.get("error") or "failed without an error message")
    return record


def collect_runs(dirs: Sequence[str | Path]) -> list[RunRecord]:
    """Every run directory under `dirs` (searched recursively), in a stable order: by folder, then job."""
    runs: dict[Path, RunRecord] = {}
    for index, root in enumerate(Path(d) for d in dirs):
        for run_dir in _find_run_dirs(root):
            resolved = run_dir.resolve()
            if resolved in runs:
                continue  # overlapping arguments: report each run once
            rel = run_dir.relative_to(root)
            record = read_run(run_dir, str(rel) if rel.parts else run_dir.name)
            record.sort_key = (index, _natural_key(rel.parts or (run_dir.name,)))
            runs[resolved] = record
    return sorted(runs.values(), key=lambda r: r.sort_key)


# ---------------------------------------------------------------- the default table


@dataclass(frozen=True)
class PruneSummary:
    """A run's compression, whichever form said it: metrics.json's `prune` entry (new: `steps`, `tau` per step,
    `criterion`, `scope`, `budget`; old: `tau_heads`/`tau_mlp`/`tau_svd`) or the config's `prune` node (`tau` a
    number, a {step: τ} mapping or null; `target_*`). Only what is known: τ found by a budget search is known
    only once the run wrote it."""

    method: str | None  # None: unknown; "none": not pruned
    taus: tuple[tuple[str, float], ...] = ()  # (step, τ) in run order
    criterion: str = DEFAULT_CRITERION
    scope: str = DEFAULT_SCOPE
    budget: tuple[str, float] | None = None  # (one of BUDGET_KEYS, its value)

    @property
    def pruned(self) -> bool:
        return self.method not in (None, "none")

    @property
    def extras(self) -> list[str]:
        """The criterion and the scope where they are not the defaults (weight, layer)."""
        return [v for v, default in ((self.criterion, DEFAULT_CRITERION), (self.scope, DEFAULT_SCOPE)) if v != default]


def _plan_steps(prune: dict[str, Any], method: str) -> list[str]:
    if isinstance(prune.get("steps"), list):
        return [str(s) for s in prune["steps"]]
    if method != "all":
        return [method]
    if isinstance(prune.get("order"), list):
        return [str(s) for s in prune["order"]]
    written = [k.removeprefix("tau_") for k in prune if k.startswith("tau_")]  # old metrics: in run order
    return written or list(PRUNE_STEPS)


def _plan_budget(prune: dict[str, Any]) -> tuple[str, float] | None:
    for source in (prune.get("budget") if isinstance(prune.get("budget"), dict) else {}, prune):
        for key in BUDGET_KEYS:
            if is_number(source.get(key)):
                return key, float(source[key])
    return None


def prune_summary(prune: dict[str, Any]) -> PruneSummary:
    """The PruneSummary of a `prune` entry or config node, any form (see PruneSummary)."""
    method = prune.get("method")
    if method in (None, "none"):
        return PruneSummary(method)
    method = str(method)
    budget = _plan_budget(prune)
    tau = prune.get("tau")
    per_step = tau if isinstance(tau, dict) else {}
    steps = _plan_steps(prune, method)
    taus: list[tuple[str, float]] = []
    # With a budget the search decides τ: only a run's own record ("steps": metrics.json) knows it.
    if budget is None or "steps" in prune:
        for step in steps:
            value = next((v for v in (per_step.get(step), prune.get(f"tau_{step}")) if v is not None), tau)
            if is_number(value):
                taus.append((step, float(value)))
    return PruneSummary(method, tuple(taus), str(prune.get("criterion") or DEFAULT_CRITERION),
                     str(prune.get("scope") or DEFAULT_SCOPE), budget)


def format_budget(budget: tuple[str, float]) -> str:
    """`≤60% GFLOPs`, `≤6 GFLOPs`, `≤15.0M params`."""
    key, value = budget
    if key == "target_ratio":
        return f"≤{100 * value:g}% GFLOPs"
    if key == "target_gflops":
        return f"≤{value:g} GFLOPs"
    millions = value / 1e6
    return f"≤{millions:.1f}M params" if round(millions, 1) == millions else f"≤{millions:g}M params"


def format_taus(taus: Sequence[tuple[str, float]]) -> str:
    """`τ=0.9` when every step used one τ, else `τ_heads=0.89 τ_mlp=0.975`; "" when none is known."""
    if len({v for _, v in taus}) == 1:
        return f"τ={taus[0][1]:g}"
    return " ".join(f"τ_{step}={v:g}" for step, v in taus)


def format_pruning(prune: dict[str, Any]) -> str:
    """The Pruning/τ cell, the same for every form that means the same (see PruneSummary): `heads τ=0.89`,
    `all τ=0.9`, `all τ_heads=0.89 τ_mlp=0.975 τ_svd=0.975`, with a budget `all ≤60% GFLOPs (τ=0.931)`
    (`≤6 GFLOPs`, `≤15.0M params`), then the criterion and scope when not weight and layer:
    `heads τ=0.9 · activation · global`. `none` when not pruned, `—` when unknown."""
    plan = prune_summary(prune)
    if not plan.pruned:
        return "none" if plan.method else "—"
    taus = format_taus(plan.taus)
    if plan.budget is not None:
        head = f"{plan.method} {format_budget(plan.budget)}" + (f" ({taus})" if taus else "")
    else:
        head = f"{plan.method} {taus}" if taus else plan.method
    return " · ".join([head, *plan.extras])


def md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _plain(value: Any) -> str:
    return "—" if value is None else str(value)


def _varying(values: Sequence[Any]) -> bool:
    return len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1


def split_columns(runs: Sequence[RunRecord]) -> tuple[list[str], list[str], dict[str, Any]]:
    """(varying override keys, varying context keys, constant values for the header).

    Context values unknown for a run (n_test of a failed one) do not make a column vary; an override
    that only some runs set does, since the others ran with the default. Resolution, which has its own
    column, is never a varying context key."""
    override_keys = sorted({k for r in runs for k in r.override_map if not _DESCRIBED.match(k)})
    constants: dict[str, Any] = {}
    varying_context = []
    for key in CONTEXT_KEYS:
        known = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        if _varying(known):
            varying_context += [] if key in _OWN_COLUMN else [key]
        elif known:
            constants[key] = known[0]
    varying_overrides = []
    for key in override_keys:
        values = [r.override_map.get(key) for r in runs]
        if _varying(values):
            varying_overrides.append(key)
        else:
            constants[key] = values[0]
    return varying_overrides, varying_context, constants


SIGNIFICANT = "†"
RESOLUTION_HEADER = "Resolution (px)"


def group_by_seed(runs: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """Rows of the table: ok runs whose overrides differ only in `seed` share one; every other run is its own."""
    rows: dict[Any, list[RunRecord]] = {}
    for run in runs:
        key = ("seeds", run.seedless) if run.ok and "seed" in run.override_map else ("run", id(run))
        rows.setdefault(key, []).append(run)
    return list(rows.values())


PARETO = "◆"


def row_mean(row: Sequence[RunRecord], key: str) -> float | None:
    """The mean of metrics.json's `key` over a table row's runs that have it (a seed group's mean)."""
    numbers = [r.metrics[key] for r in row if is_number(r.metrics.get(key))]
    return math.fsum(numbers) / len(numbers) if numbers else None


def pareto_optimal(points: Sequence[tuple[float, float] | None]) -> list[bool]:
    """For each (AUROC, GFLOPs) point, whether no other point has AUROC ≥ and GFLOPs ≤ with one of them
    strictly better. None (a failed row, or one without both numbers) is never optimal and beats nothing;
    equal points do not beat each other, so ties are all optimal."""
    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    known = [p for p in points if p is not None]
    return [p is not None and not any(beats(q, p) for q in known) for p in points]


def row_point(row: Sequence[RunRecord]) -> tuple[float, float] | None:
    """(test AUROC, GFLOPs) of an ok row, seed groups by their means; None when it has not both."""
    if not row[0].ok:
        return None
    auroc, gflops = row_mean(row, "auroc"), row_mean(row, "gflops")
    return None if auroc is None or gflops is None else (auroc, gflops)


def pareto_rows(rows: Sequence[Sequence[RunRecord]]) -> list[bool]:
    """Which table rows (group_by_seed) are Pareto-optimal in (test AUROC higher, GFLOPs lower)."""
    return pareto_optimal([row_point(row) for row in rows])


def value_cell(run: RunRecord, key: str, ci: bool) -> str:
    text = format_cell(key, run.metrics.get(key), run.change_pct.get(key))
    if key in METRIC_NAMES and run.significant(key):
        text += SIGNIFICANT
    if ci and key in run.ci95:
        text += f" {format_interval(key, run.ci95[key])}"
    return text


def _table_notes(runs: Sequence[RunRecord], constants: dict[str, Any], ci: bool, repeats: bool,
                 pareto: bool) -> list[str]:
    """The lines above summary.md's table: what the data is, the counts, what is constant, each mark's meaning."""
    counts = {s: sum(r.status == s for r in runs) for s in ("ok", "failed", "interrupted", "missing")}
    lines = ["# Sweep summary", ""]
    if any(r.data == "synthetic" for r in runs):
        lines += [f"> **{SYNTHETIC_NOTE}.** These numbers describe the generated stand-in, not PatchCamelyon.", ""]
    lines += [f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
    if constants:
        lines += [" · ".join(f"{k}: {v}" for k, v in constants.items()), ""]
    lines += ["Relative change (↓/↑ %, direction only) is against the same trained model uncompressed and in f32; "
              "uncompressed rows are that reference. Raw numbers and run directories: summary.csv.", ""]
    if any(r.significant(m) for r in runs for m in METRIC_NAMES):
        lines += [f"{SIGNIFICANT} the paired 95% bootstrap interval of the difference to that uncompressed f32 "
                  "model excludes 0 (metrics.json → reference.paired).", ""]
    if ci:
        lines += ["[lo, hi]: 95% bootstrap interval of the test metric (metrics.json → ci95, ci_method).", ""]
    if repeats:
        lines += ["Runs that differ only in seed share a row: mean ± sample sd over its n runs.", ""]
    if pareto:
        lines += [f"{PARETO} Pareto-optimal: no other ok row has a test AUROC as high and GFLOPs as low with one of "
                  "them strictly better (seed rows by their means); GFLOPs are at each row's resolution. "
                  "frontier.png plots AUROC against GFLOPs.", ""]
    return lines


def markdown_table(runs: Sequence[RunRecord], ci: bool = False) -> str:
    """summary.md: a header with what is constant, then one row per run or per group of seeds."""
    varying_overrides, varying_context, constants = split_columns(runs)
    rows = group_by_seed(runs)
    repeats = any(len(row) > 1 for row in rows)
    optimal = pareto_rows(rows)
    lines = _table_notes(runs, constants, ci, repeats, any(optimal))
    show_status = any(not r.ok for r in runs)
    header = ["Job", *varying_overrides, *varying_context, "Method", "Quantization", "Pruning/τ", RESOLUTION_HEADER,
              *(h for _, h in VALUE_COLUMNS)] + (["Pareto"] if any(optimal) else []) + (["n"] if repeats else []) \
        + (["Status"] if show_status else [])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    for row, is_optimal in zip(rows, optimal, strict=True):
        run = row[0]
        cells = [",".join(r.job for r in row),
                 *(",".join(dict.fromkeys(_plain(r.override_map.get(k)) for r in row)) for k in varying_overrides),
                 *(_plain(getattr(run, k)) for k in varying_context),
                 _plain(run.method), run.quantization, format_pruning(run.prune), _plain(run.resolution)]
        if len(row) > 1:
            cells += [format_mean_sd(key, [r.metrics.get(key) for r in row]) for key, _ in VALUE_COLUMNS]
        else:
            cells += [value_cell(run, key, ci) for key, _ in VALUE_COLUMNS]
        cells += [PARETO if is_optimal else ""] if any(optimal) else []
        cells += [str(len(row))] if repeats else []
        if show_status:
            cells.append(run.status if run.ok else f"{run.status}: {shorten(run.error or '')}")
        lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- csv


def prune_csv(runs: Sequence[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """summary.csv's compression columns: method, τ per step (tau_heads, tau_mlp, tau_svd, then any other step
    a run has), criterion, scope, budget (prune_target_*) and what a budget search achieved (prune_achieved_*)."""
    plans = [r.plan for r in runs]
    steps = [*PRUNE_STEPS, *dict.fromkeys(s for p in plans for s, _ in p.taus if s not in PRUNE_STEPS)]
    achieved = ("gflops_ratio", "params_ratio")
    columns = ["prune_method", *(f"tau_{s}" for s in steps), "prune_criterion", "prune_scope",
               *(f"prune_{k}" for k in BUDGET_KEYS), *(f"prune_achieved_{k}" for k in achieved)]
    rows = []
    for run, plan in zip(runs, plans, strict=True):
        found = run.prune.get("achieved") if isinstance(run.prune.get("achieved"), dict) else {}
        rows.append({"prune_method": plan.method, **{f"tau_{s}": dict(plan.taus).get(s) for s in steps},
                     "prune_criterion": plan.criterion if plan.pruned else None,
                     "prune_scope": plan.scope if plan.pruned else None,
                     **{f"prune_{k}": plan.budget[1] if plan.budget and plan.budget[0] == k else None
                        for k in BUDGET_KEYS},
                     **{f"prune_achieved_{k}": found.get(k) for k in achieved}})
    return columns, rows


def csv_rows(runs: Sequence[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of summary.csv: raw values only, `None` where a run has none. `pareto`: the run's
    summary.md row is marked Pareto-optimal (a seed group by its means)."""
    override_keys = sorted({k for r in runs for k in r.override_map})
    values = [key for key, _ in VALUE_COLUMNS]
    described = ["n_test", "tta", "tta_views", "resolution", "eval_precision"]
    extras = sorted({k for r in runs for k, v in r.metrics.items() if not isinstance(v, dict | list)}
                    - _SKIP_CSV - set(values) - set(described) - {"data", "model", "method", "quant", "pareto"})
    intervals = [f"{k}.ci95_{end}" for k in METRIC_NAMES for end in ("lo", "hi")]
    paired = [*(f"reference.paired.{k}.diff" for k in METRIC_NAMES), "reference.paired.auroc.p_delong"]
    prune_columns, prune_values = prune_csv(runs)
    rows_of = group_by_seed(runs)
    optimal = {id(r): flag for row, flag in zip(rows_of, pareto_rows(rows_of), strict=True) for r in row}
    columns = ["job", "status", "error", "run_dir", "overrides", *(f"override.{k}" for k in override_keys),
               "method", "model", "data", "quant", *prune_columns, *values, "pareto", *intervals, *described,
               *extras, *(f"reference.{k}" for k in values), *paired]
    rows = []
    for run, prune in zip(runs, prune_values, strict=True):
        reference = run.metrics.get("reference") or {}
        rows.append({
            "job": run.job, "status": run.status, "error": run.error, "run_dir": str(run.run_dir),
            "overrides": " ".join(run.overrides), **{f"override.{k}": run.override_map.get(k) for k in override_keys},
            "method": run.method, "model": run.model, "data": run.data, "quant": run.quant, **prune,
            **{k: run.metrics.get(k) for k in (*values, *extras)}, "pareto": optimal[id(run)], "n_test": run.n_test,
            "tta": run.metrics.get("tta"), "tta_views": run.tta_views, "resolution": run.resolution,
            "eval_precision": run.eval_precision, **{f"reference.{k}": reference.get(k) for k in values},
            **{f"{k}.ci95_{end}": (run.ci95.get(k) or [None, None])[i] for k in METRIC_NAMES
               for i, end in enumerate(("lo", "hi"))},
            **{f"reference.paired.{k}.diff": (reference.get("paired") or {}).get(k, {}).get("diff")
               for k in METRIC_NAMES},
            "reference.paired.auroc.p_delong": (reference.get("paired") or {}).get("auroc", {}).get("p_delong"),
        })
    return columns, rows


def csv_text(runs: Sequence[RunRecord]) -> str:
    columns, rows = csv_rows(runs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


# ---------------------------------------------------------------- roc


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["prob"]) for r in rows])


def run_predictions(runs: Sequence[RunRecord]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(legend label, labels, probs) of every ok run whose predictions.csv reads back; the label names the run
    by the overrides that differ across the sweep."""
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.override_map)
            if _varying([r.override_map.get(k) for r in runs])]
    out = []
    for run in runs:
        pred = run.run_dir / run_files.PREDICTIONS
        if not run.ok or not pred.is_file():
            continue
        try:
            labels, probs = read_predictions(pred)
            roc_auc_score(labels, probs)  # both classes, valid probabilities
        except (OSError, ValueError, KeyError):
            continue  # one unreadable file must not cost the whole figure
        parts = [f"{k}={run.override_map[k]}" for k in keys if k in run.override_map]
        label = " ".join(parts) or " · ".join([_plain(run.method), run.quantization, format_pruning(run.prune)])
        out.append((f"{run.job}: {label}", labels, probs))
    return out


def _sweep_title(runs: Sequence[RunRecord], what: str) -> str:
    return what + (f" ({SYNTHETIC_NOTE})" if any(r.data == "synthetic" for r in runs) else "")


def plot_sweep_roc(runs: Sequence[RunRecord], path: Path) -> Path:
    """One ROC curve per ok run with predictions; the legend says which run and its AUROC."""
    fig, ax = plt.subplots(figsize=(7, 6))
    curves = run_predictions(runs)
    for label, labels, probs in curves:
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{label} (AUROC {roc_auc_score(labels, probs):.4f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=_sweep_title(runs, "Sweep ROC"),
           xlim=(0, 1), ylim=(0, 1.01))
    if curves:
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no ok runs with predictions", ha="center", va="center")
    fig.tight_layout()
    with disk.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- entry points

STYLES = ("default", "reference")


def write_summary(runs: Sequence[RunRecord], out_dir: str | Path, style: str = "default",
                  baseline: str | Path | None = None, ci: bool | None = None) -> dict[str, Path]:
    """Write summary.csv, summary.md, roc.png, calibration.png and, when an ok run has GFLOPs and AUROC,
    frontier.png into `out_dir`; returns their paths by kind (csv, md, roc, calibration, frontier).

    style: "default" (every run, changes against each run's own uncompressed model) or "reference" (the
    reference table's layout, changes against one `baseline` run; see pcamx.report.reference_table).
    ci: each metric with its 95% interval in summary.md; None = the style's default (on for reference)."""
    from pcamx.report.frontier import plot_frontier
    from pcamx.report.reference_table import pick_baseline, reference_table

    out_dir = Path(out_dir)
    if (out_dir / run_files.METRICS).is_file():
        # A run directory has its own roc.png; the sweep figure must not replace it.
        raise ValueError(f"{out_dir} is a run directory; write the sweep summary elsewhere (--out)")
    if style not in STYLES:
        raise ValueError(f"unknown table style {style!r}; allowed: {', '.join(STYLES)}")
    if baseline is not None and style != "reference":
        raise ValueError("a baseline run only applies to --style reference")
    if style == "reference":
        md = reference_table(runs, pick_baseline(runs, baseline), ci=True if ci is None else ci)
    else:
        md = markdown_table(runs, ci=bool(ci))
    paths = {
        "csv": disk.write_text(out_dir / run_files.SUMMARY_CSV, csv_text(runs)),
        "md": disk.write_text(out_dir / run_files.SUMMARY_MD, md),
        "roc": plot_sweep_roc(runs, out_dir / run_files.ROC),
        "calibration": plot_reliability(out_dir / run_files.CALIBRATION, run_predictions(runs),
                                        _sweep_title(runs, "Sweep reliability")),
    }
    frontier = plot_frontier(runs, out_dir / run_files.FRONTIER)
    if frontier is not None:
        paths["frontier"] = frontier
    else:
        (out_dir / run_files.FRONTIER).unlink(missing_ok=True)  # an earlier table's figure would not match this one
    return paths


def summarize(dirs: Sequence[str | Path], out_dir: str | Path, style: str = "default",
              baseline: str | Path | None = None, ci: bool | None = None) -> tuple[list[RunRecord], dict[str, Path]]:
    """collect_runs + write_summary."""
    runs = collect_runs(dirs)
    return runs, write_summary(runs, out_dir, style, baseline, ci)


def any_failed(runs: Iterable[RunRecord]) -> bool:
    return any(not r.ok for r in runs)
