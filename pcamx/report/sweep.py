"""The default sweep table and figures of a set of runs (pcamx.report.runs), written by pcamx.report.summary:
summary.csv (one row per run, raw numbers, traceable by run_dir), summary.md (a row per run or per seed group,
mean ± sd; a compressed or quantized run's change against its own uncompressed f32 model, † where the paired 95%
interval excludes 0, ◆ the Pareto-optimal rows in test AUROC and GFLOPs), roc.png and calibration.png.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the table is written at the end of cluster sweeps
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from pcamx.evaluation.metrics import METRIC_NAMES  # noqa: E402
from pcamx.report.format import VALUE_COLUMNS, format_cell, format_interval, format_mean_sd  # noqa: E402
from pcamx.report.runs import (  # noqa: E402
    BUDGET_KEYS,
    PARETO,
    PRUNE_DEFAULTS,
    SIGNIFICANT,
    SYNTHETIC_NOTE,
    RunRecord,
    format_pruning,
    group_by_seed,
    md_escape,
    pareto_rows,
    shorten,
    sweep_title,
)
from pcamx.runtime import disk, run_files  # noqa: E402

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


# ---------------------------------------------------------------- the default table


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


RESOLUTION_HEADER = "Resolution (px)"


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
    order = PRUNE_DEFAULTS["order"]
    steps = [*order, *dict.fromkeys(s for p in plans for s, _ in p.taus if s not in order)]
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


def plot_sweep_roc(runs: Sequence[RunRecord], path: Path) -> Path:
    """One ROC curve per ok run with predictions; the legend says which run and its AUROC."""
    fig, ax = plt.subplots(figsize=(7, 6))
    curves = run_predictions(runs)
    for label, labels, probs in curves:
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{label} (AUROC {roc_auc_score(labels, probs):.4f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=sweep_title(runs, "Sweep ROC"),
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


