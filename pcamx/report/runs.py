"""The runs a report is made of: every run directory under some folders, read into one record each.

A run directory is any folder holding `metrics.json` (written by every run, ok or failed) or
`.hydra/overrides.yaml` (written by Hydra before the job starts, so a job killed before it wrote
metrics.json still shows up, as "missing"). Hydra's multirun.yaml is deliberately not read: a Slurm
sweep whose launcher process died never gets one that matches what ran.

Also here: what every table derives from the records alone (a run's compression in any of its recorded forms,
the rows that differ only in their seed, which rows are Pareto-optimal in test AUROC against GFLOPs).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pcamx.evaluation.uncertainty import excludes_zero
from pcamx.report.format import is_number, quantization_label
from pcamx.runtime import run_files
from pcamx.runtime.conf import conf_defaults

# Forms of the prune entry written before a key existed are read with conf/prune's defaults for it.
PRUNE_DEFAULTS = conf_defaults("prune")
BUDGET_KEYS = tuple(k for k in PRUNE_DEFAULTS if k.startswith("target_"))

# Each descriptive field: its metrics.json key, then the config key that says it for a run without metrics.
_FIELDS = {"method": "method.name", "model": "model.name", "data": "data.name", "quant": "quant.mode",
           "eval_precision": "eval.precision", "resolution": "data.resolution", "method_config": "method",
           "n_test": None}


SYNTHETIC_NOTE = "synthetic stand-in data — not PCam"


ERROR_WIDTH = 80


SIGNIFICANT = "†"


PARETO = "◆"


@dataclass
class RunRecord:
    """One run directory as found on disk; `status` is "ok", "failed", "interrupted", "pruned" (a search trial
    its pruner stopped) or "missing" (no
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
    record.status = status if status in ("ok", "interrupted", "pruned") else "failed"
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


def any_failed(runs: Iterable[RunRecord]) -> bool:
    """Whether a run did not finish ok (a pruned search trial stopped as it should: not a failure)."""
    return any(not r.ok and r.status != "pruned" for r in runs)


@dataclass(frozen=True)
class PruneSummary:
    """A run's compression, whichever form said it: metrics.json's `prune` entry (new: `steps`, `tau` per step,
    `criterion`, `scope`, `budget`; old: `tau_heads`/`tau_mlp`/`tau_svd`) or the config's `prune` node (`tau` a
    number, a {step: τ} mapping or null; `target_*`). Only what is known: τ found by a budget search is known
    only once the run wrote it."""

    method: str | None  # None: unknown; "none": not pruned
    taus: tuple[tuple[str, float], ...] = ()  # (step, τ) in run order
    criterion: str = PRUNE_DEFAULTS["criterion"]
    scope: str = PRUNE_DEFAULTS["scope"]
    budget: tuple[str, float] | None = None  # (one of BUDGET_KEYS, its value)

    @property
    def pruned(self) -> bool:
        return self.method not in (None, "none")

    @property
    def extras(self) -> list[str]:
        """The criterion and the scope where they are not the defaults (weight, layer)."""
        return [v for v, key in ((self.criterion, "criterion"), (self.scope, "scope")) if v != PRUNE_DEFAULTS[key]]


def _plan_steps(prune: dict[str, Any], method: str) -> list[str]:
    if isinstance(prune.get("steps"), list):
        return [str(s) for s in prune["steps"]]
    if method != "all":
        return [method]
    if isinstance(prune.get("order"), list):
        return [str(s) for s in prune["order"]]
    written = [k.removeprefix("tau_") for k in prune if k.startswith("tau_")]  # old metrics: in run order
    return written or list(PRUNE_DEFAULTS["order"])


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
    return PruneSummary(method, tuple(taus), str(prune.get("criterion") or PRUNE_DEFAULTS["criterion"]),
                     str(prune.get("scope") or PRUNE_DEFAULTS["scope"]), budget)


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


def group_by_seed(runs: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """Rows of the table: ok runs whose overrides differ only in `seed` share one; every other run is its own."""
    rows: dict[Any, list[RunRecord]] = {}
    for run in runs:
        key = ("seeds", run.seedless) if run.ok and "seed" in run.override_map else ("run", id(run))
        rows.setdefault(key, []).append(run)
    return list(rows.values())


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


def sweep_title(runs: Sequence[RunRecord], what: str) -> str:
    return what + (f" ({SYNTHETIC_NOTE})" if any(r.data == "synthetic" for r in runs) else "")
