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
  calibration.png  one reliability curve per ok run.
"""

from __future__ import annotations

import csv
import io as _io
import json
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

from pcamx import io  # noqa: E402
from pcamx.metrics import METRIC_NAMES  # noqa: E402
from pcamx.report.format import (  # noqa: E402
    VALUE_COLUMNS,
    format_cell,
    format_interval,
    format_mean_sd,
    quantization_label,
)
from pcamx.report.run_files import plot_reliability  # noqa: E402
from pcamx.uncertainty import excludes_zero  # noqa: E402

METRICS_FILE = "metrics.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
CONFIG_FILE = Path(".hydra") / "config.yaml"
PREDICTIONS_FILE = "predictions.csv"
TAU_KEYS = ("tau_heads", "tau_mlp", "tau_svd")
# Describe the run; shown in the header when constant across the sweep, as columns when not.
CONTEXT_KEYS = ("data", "model", "tta_views", "resolution", "n_test")
# Overrides already shown by the Method / Quantization / Pruning/τ columns or the context fields.
_DESCRIBED = re.compile(
    r"^(method|quant|quant\.mode|prune|prune\.method|prune\.tau\w*|data|model|data\.resolution|eval\.tta(_views)?"
    r"|eval\.precision)$")
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
        """{"method": ..., "tau_*": ...}; method "none" when not pruned, None when unknown."""
        return dict(self.metrics.get("prune") or self.config.get("prune") or {"method": None})

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
    if (root / METRICS_FILE).is_file() or (root / OVERRIDES_FILE).is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if METRICS_FILE in filenames or (here / OVERRIDES_FILE).is_file():
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
    overrides = _load_yaml(run_dir / OVERRIDES_FILE) if (run_dir / OVERRIDES_FILE).is_file() else None
    config = _load_yaml(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else None
    record = RunRecord(run_dir=run_dir, job=job, status="missing",
                       overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
                       config=config if isinstance(config, dict) else {})
    path = run_dir / METRICS_FILE
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


def format_pruning(prune: dict[str, Any]) -> str:
    """`heads τ=0.89`, `all τ=0.9`, `all τ_heads=0.89 τ_mlp=0.975`: from metrics.json's resolved τ per step,
    or from a config (a run without metrics), where a step without its own τ uses `tau`."""
    method = prune.get("method")
    if method in (None, "none"):
        return "none" if method else "—"
    steps = [k.removeprefix("tau_") for k in TAU_KEYS] if method == "all" else [method]
    taus = {f"tau_{s}": prune.get(f"tau_{s}", None) if prune.get(f"tau_{s}") is not None else prune.get("tau")
            for s in steps}
    taus = {k: v for k, v in taus.items() if v is not None}
    if not taus:
        return str(method)
    if len(set(taus.values())) == 1:
        return f"{method} τ={next(iter(taus.values())):g}"
    return f"{method} " + " ".join(f"τ_{k.removeprefix('tau_')}={v:g}" for k, v in taus.items())


def md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _plain(value: Any) -> str:
    return "—" if value is None else str(value)


def _varying(values: Sequence[Any]) -> bool:
    return len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1


def split_columns(runs: Sequence[RunRecord]) -> tuple[list[str], list[str], dict[str, Any]]:
    """(varying override keys, varying context keys, constant values for the header).

    Context values unknown for a run (n_test of a failed one) do not make a column vary; an override
    that only some runs set does, since the others ran with the default."""
    override_keys = sorted({k for r in runs for k in r.override_map if not _DESCRIBED.match(k)})
    constants: dict[str, Any] = {}
    varying_context = []
    for key in CONTEXT_KEYS:
        known = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        if _varying(known):
            varying_context.append(key)
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


def group_by_seed(runs: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """Rows of the table: ok runs whose overrides differ only in `seed` share one; every other run is its own."""
    rows: dict[Any, list[RunRecord]] = {}
    for run in runs:
        key = ("seeds", run.seedless) if run.ok and "seed" in run.override_map else ("run", id(run))
        rows.setdefault(key, []).append(run)
    return list(rows.values())


def value_cell(run: RunRecord, key: str, ci: bool) -> str:
    text = format_cell(key, run.metrics.get(key), run.change_pct.get(key))
    if key in METRIC_NAMES and run.significant(key):
        text += SIGNIFICANT
    if ci and key in run.ci95:
        text += f" {format_interval(key, run.ci95[key])}"
    return text


def markdown_table(runs: Sequence[RunRecord], ci: bool = False) -> str:
    """summary.md: a header with what is constant, then one row per run or per group of seeds."""
    varying_overrides, varying_context, constants = split_columns(runs)
    rows = group_by_seed(runs)
    repeats = any(len(row) > 1 for row in rows)
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
    show_status = any(not r.ok for r in runs)
    header = ["Job", *varying_overrides, *varying_context, "Method", "Quantization", "Pruning/τ",
              *(h for _, h in VALUE_COLUMNS)] + (["n"] if repeats else []) + (["Status"] if show_status else [])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        run = row[0]
        cells = [",".join(r.job for r in row),
                 *(",".join(dict.fromkeys(_plain(r.override_map.get(k)) for r in row)) for k in varying_overrides),
                 *(_plain(getattr(run, k)) for k in varying_context),
                 _plain(run.method), run.quantization, format_pruning(run.prune)]
        if len(row) > 1:
            cells += [format_mean_sd(key, [r.metrics.get(key) for r in row]) for key, _ in VALUE_COLUMNS]
        else:
            cells += [value_cell(run, key, ci) for key, _ in VALUE_COLUMNS]
        cells += [str(len(row))] if repeats else []
        if show_status:
            cells.append(run.status if run.ok else f"{run.status}: {shorten(run.error or '')}")
        lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- csv


def csv_rows(runs: Sequence[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of summary.csv: raw values only, `None` where a run has none."""
    override_keys = sorted({k for r in runs for k in r.override_map})
    values = [key for key, _ in VALUE_COLUMNS]
    described = ["n_test", "tta", "tta_views", "resolution", "eval_precision"]
    extras = sorted({k for r in runs for k, v in r.metrics.items() if not isinstance(v, dict | list)}
                    - _SKIP_CSV - set(values) - set(described) - {"data", "model", "method", "quant"})
    intervals = [f"{k}.ci95_{end}" for k in METRIC_NAMES for end in ("lo", "hi")]
    paired = [*(f"reference.paired.{k}.diff" for k in METRIC_NAMES), "reference.paired.auroc.p_delong"]
    columns = ["job", "status", "error", "run_dir", "overrides", *(f"override.{k}" for k in override_keys),
               "method", "model", "data", "quant", "prune_method", *TAU_KEYS, *values, *intervals, *described,
               *extras, *(f"reference.{k}" for k in values), *paired]
    rows = []
    for run in runs:
        reference = run.metrics.get("reference") or {}
        rows.append({
            "job": run.job, "status": run.status, "error": run.error, "run_dir": str(run.run_dir),
            "overrides": " ".join(run.overrides), **{f"override.{k}": run.override_map.get(k) for k in override_keys},
            "method": run.method, "model": run.model, "data": run.data, "quant": run.quant,
            "prune_method": run.prune.get("method"), **{k: run.prune.get(k) for k in TAU_KEYS},
            **{k: run.metrics.get(k) for k in (*values, *extras)}, "n_test": run.n_test,
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
    buf = _io.StringIO()
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
        pred = run.run_dir / PREDICTIONS_FILE
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
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- entry points

STYLES = ("default", "reference")


def write_summary(runs: Sequence[RunRecord], out_dir: str | Path, style: str = "default",
                  baseline: str | Path | None = None, ci: bool | None = None) -> dict[str, Path]:
    """Write summary.csv, summary.md, roc.png and calibration.png into `out_dir`; returns their paths by kind.

    style: "default" (every run, changes against each run's own uncompressed model) or "reference" (the
    reference table's layout, changes against one `baseline` run; see pcamx.report.reference_table).
    ci: each metric with its 95% interval in summary.md; None = the style's default (on for reference)."""
    from pcamx.report.reference_table import pick_baseline, reference_table

    out_dir = Path(out_dir)
    if (out_dir / METRICS_FILE).is_file():
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
    return {
        "csv": io.write_text(out_dir / "summary.csv", csv_text(runs)),
        "md": io.write_text(out_dir / "summary.md", md),
        "roc": plot_sweep_roc(runs, out_dir / "roc.png"),
        "calibration": plot_reliability(out_dir / "calibration.png", run_predictions(runs),
                                        _sweep_title(runs, "Sweep reliability")),
    }


def summarize(dirs: Sequence[str | Path], out_dir: str | Path, style: str = "default",
              baseline: str | Path | None = None, ci: bool | None = None) -> tuple[list[RunRecord], dict[str, Path]]:
    """collect_runs + write_summary."""
    runs = collect_runs(dirs)
    return runs, write_summary(runs, out_dir, style, baseline, ci)


def any_failed(runs: Iterable[RunRecord]) -> bool:
    return any(not r.ok for r in runs)
