"""Sweep tables: collect every run directory under some folders and compare them side by side.

A run directory is any folder holding `metrics.json` (written by every run, ok or failed) or
`.hydra/overrides.yaml` (written by Hydra before the job starts, so a job killed before it wrote
metrics.json still shows up, as "missing"). Hydra's multirun.yaml is deliberately not read: a Slurm
sweep whose launcher process died never gets one that matches what ran.

Outputs (see `write_summary`):
  summary.csv  one row per run, raw numbers only, each traceable through its run_dir column;
  summary.md   the reference results table, with relative changes against the uncompressed model;
  roc.png      one ROC curve per ok run, labelled by the overrides that differ across the sweep.

Relative change in summary.md: a compressed run (quantization other than none, or pruning other
than none) shows `value (↓x.x%)` / `value (↑x.x%)`, the change in percent of the reference value,
for every column that has a reference value. The arrow gives the direction only, not whether it is
better (↓ is good for ECE, bad for AUROC). The reference is the run's own `reference` entry in
metrics.json (the same trained model before compression) or, if that is absent, the one ok
uncompressed run of the sweep with the same method, model, data and other overrides. Uncompressed
runs show plain values: they are the reference.
"""

from __future__ import annotations

import csv
import io as _io
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

from pcamx import io  # noqa: E402

METRICS_FILE = "metrics.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
CONFIG_FILE = Path(".hydra") / "config.yaml"
PREDICTIONS_FILE = "predictions.csv"

METRIC_KEYS = ("auroc", "auprc", "sens_at_95spec", "ece", "brier", "acc", "nll")
FOOTPRINT_KEYS = ("params", "gflops", "memory_mb")
TAU_KEYS = ("tau_heads", "tau_mlp", "tau_svd")
# Describe the run; shown in the header when constant across the sweep, as columns when not.
CONTEXT_KEYS = ("data", "model", "tta_views", "resolution", "n_test")
# Overrides already shown by the Method / Quantization / Pruning/τ columns or the context fields.
_DESCRIBED = re.compile(
    r"^(method|quant|quant\.mode|prune|prune\.method|prune\.tau\w*|data|model|data\.resolution|eval\.tta(_views)?"
    r"|eval\.precision)$")
# Scalars of metrics.json that are not numbers to compare but are still worth a CSV column.
_SKIP_CSV = {"status", "error", "traceback", "run_dir", "prune", "reference", "val"}

MD_COLUMNS = ("Method", "Quantization", "Pruning/τ", "Parameters", "GFLOPs", "Memory (MB)", "AUROC", "AUPRC",
              "Sens@95%Spec", "ECE", "Brier", "Acc", "NLL")
_VALUE_COLUMNS = dict(zip(MD_COLUMNS[3:], (*FOOTPRINT_KEYS, *METRIC_KEYS), strict=True))
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
        out = {}
        for item in self.overrides:
            key, _, value = item.partition("=")
            out[key.lstrip("+")] = value
        return out

    @property
    def method(self) -> str | None:
        return self.metrics.get("method") or _select(self.config, "method.name")

    @property
    def model(self) -> str | None:
        return self.metrics.get("model") or _select(self.config, "model.name")

    @property
    def data(self) -> str | None:
        # metrics.json knows what was actually read (the synthetic marker), the config only what was asked.
        return self.metrics.get("data") or _select(self.config, "data.name")

    @property
    def tta(self) -> bool | None:
        return self.metrics["tta"] if "tta" in self.metrics else _select(self.config, "eval.tta")

    @property
    def tta_views(self) -> int | None:
        """Test-time views averaged (1 = no TTA); from the config when the run wrote no metrics."""
        if "tta_views" in self.metrics:
            return self.metrics["tta_views"]
        views = _select(self.config, "eval.tta_views")
        return None if views is None else (views if _select(self.config, "eval.tta") else 1)

    @property
    def resolution(self) -> int | None:
        return self.metrics.get("resolution") or _select(self.config, "data.resolution")

    @property
    def eval_precision(self) -> str | None:
        """fp32 | bf16-autocast | bf16 | int8-weight-only | int8-dynamic (see pcamx.quant.eval_precision_label)."""
        return self.metrics.get("eval_precision") or _select(self.config, "eval.precision")

    @property
    def method_config(self) -> dict[str, Any]:
        return self.metrics.get("method_config") or _select(self.config, "method") or {}

    @property
    def quantization(self) -> str:
        """The Quantization column: what the weights are and the precision the row was evaluated at."""
        return quantization_label(self.quant, self.eval_precision)

    @property
    def n_test(self) -> int | None:
        return self.metrics.get("n_test")

    @property
    def quant(self) -> str | None:
        """"none" when an ok run does not say (older metrics.json); None when a failed run's config is lost."""
        if self.ok:
            return self.metrics.get("quant") or "none"
        q = self.config.get("quant", self.override_map.get("quant"))
        if isinstance(q, dict):
            q = q.get("mode") or q.get("name")
        return q or ("none" if self.config else None)

    @property
    def prune(self) -> dict[str, Any]:
        """{"method": ..., "tau_*": ...}; method "none" when not pruned, None when unknown."""
        p = self.metrics.get("prune") if self.ok else self.config.get("prune") or self._prune_from_overrides()
        if isinstance(p, str):
            p = {"method": p}
        p = dict(p or {})
        p.setdefault("method", "none" if self.ok or self.config else None)
        return p

    def _prune_from_overrides(self) -> dict[str, Any]:
        # Last resort for a failed run whose config has no prune node: what the command line asked for.
        o = self.override_map
        p: dict[str, Any] = {}
        if "prune" in o or "prune.method" in o:
            p["method"] = o.get("prune.method", o.get("prune"))
        for key in TAU_KEYS:
            value = o.get(f"prune.{key}", o.get("prune.tau"))
            if value is not None:
                try:
                    p[key] = float(value)
                except ValueError:
                    p[key] = value
        return p

    @property
    def compressed_model(self) -> bool:
        """Pruned (the architecture changed), not merely quantized."""
        return self.prune["method"] not in (None, "none")

    @property
    def compressed(self) -> bool:
        return self.quant not in (None, "none") or self.prune["method"] not in (None, "none")

    def context(self, key: str) -> Any:
        return getattr(self, key)


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
            job = str(rel) if rel.parts else run_dir.name
            record = read_run(run_dir, job)
            record.sort_key = (index, _natural_key(rel.parts or (run_dir.name,)))
            runs[resolved] = record
    return sorted(runs.values(), key=lambda r: r.sort_key)


# ---------------------------------------------------------------- references


def _reference_key(run: RunRecord) -> tuple:
    others = tuple(sorted((k, v) for k, v in run.override_map.items() if not _DESCRIBED.match(k)))
    return (run.method, run.model, run.data, run.tta_views, run.resolution, run.n_test, others)


def find_references(runs: Sequence[RunRecord]) -> dict[Path, tuple[dict[str, Any], str]]:
    """run_dir → (reference values, where they come from) for every compressed run that has one."""
    baselines: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        if run.ok and not run.compressed:
            baselines.setdefault(_reference_key(run), []).append(run)
    refs = {}
    for run in runs:
        if not run.compressed:
            continue
        own = run.metrics.get("reference")
        if isinstance(own, dict) and own:
            refs[run.run_dir] = (own, "self")
            continue
        # Two candidate baselines would make the change ambiguous: show none rather than guess.
        candidates = baselines.get(_reference_key(run), [])
        if len(candidates) == 1:
            refs[run.run_dir] = (candidates[0].metrics, str(candidates[0].run_dir))
    return refs


# ---------------------------------------------------------------- formatting


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def format_value(key: str, value: Any) -> str:
    if not _is_number(value):
        return "—"
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if key in ("gflops", "memory_mb"):
        # Two decimals for ViT-S sizes; significant digits for the tiny test model's 0.0012 GFLOPs.
        return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.2g}"
    return f"{value:.4f}"


def format_change(value: Any, reference: Any) -> str:
    """`↓7.0%`: change of `value` in percent of `reference`; "" when there is nothing to compare."""
    if not (_is_number(value) and _is_number(reference)) or reference == 0:
        return ""
    pct = (value - reference) / abs(reference) * 100
    if round(pct, 1) == 0:
        return "±0.0%"
    return f"{'↑' if pct > 0 else '↓'}{abs(pct):.1f}%"


def format_cell(key: str, value: Any, reference: Any = None) -> str:
    text = format_value(key, value)
    change = format_change(value, reference) if text != "—" else ""
    return f"{text} ({change})" if change else text


def quantization_label(quant: str | None, eval_precision: str | None) -> str:
    """`none (f32)`, `none (bf16 autocast)`, `bf16`, `int8 (dynamic)`, … as in the reference table."""
    if quant is None:
        return "—"
    if quant == "none":
        if eval_precision in (None, "fp32"):
            return "none (f32)"
        return f"none ({eval_precision.replace('-', ' ')})"
    if eval_precision and eval_precision != quant and eval_precision.startswith(f"{quant}-"):
        return f"{quant} ({eval_precision.removeprefix(quant + '-')})"
    return quant


def format_pruning(prune: dict[str, Any]) -> str:
    method = prune.get("method")
    if method in (None, "none"):
        return "none" if method else "—"
    taus = {k: prune.get(k) for k in TAU_KEYS if prune.get(k) is not None}
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
        known = [r.context(key) for r in runs if r.context(key) is not None]
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


def markdown_table(runs: Sequence[RunRecord]) -> str:
    """summary.md: a header with what is constant, then one row per run."""
    refs = find_references(runs)
    varying_overrides, varying_context, constants = split_columns(runs)
    counts = {s: sum(r.status == s for r in runs) for s in ("ok", "failed", "interrupted", "missing")}
    lines = ["# Sweep summary", ""]
    if any(r.data == "synthetic" for r in runs):
        lines += [f"> **{SYNTHETIC_NOTE}.** These numbers describe the generated stand-in, not PatchCamelyon.", ""]
    lines.append(f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    lines.append("")
    if constants:
        lines += [" · ".join(f"{k}: {v}" for k, v in constants.items()), ""]
    lines += [
        "Relative change (↓/↑ %, direction only) is against the uncompressed f32 model of the same "
        "method; uncompressed rows are that reference. Raw numbers and run directories: summary.csv.",
        "",
    ]
    show_status = any(not r.ok for r in runs)
    header = ["Job", *varying_overrides, *varying_context, *MD_COLUMNS] + (["Status"] if show_status else [])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    for run in runs:
        ref = refs.get(run.run_dir, ({}, ""))[0]
        cells = [run.job]
        cells += [_plain(run.override_map.get(k)) for k in varying_overrides]
        cells += [_plain(run.context(k)) for k in varying_context]
        cells += [_plain(run.method), run.quantization, format_pruning(run.prune)]
        cells += [format_cell(key, run.metrics.get(key), ref.get(key)) for key in _VALUE_COLUMNS.values()]
        if show_status:
            cells.append(run.status if run.ok else f"{run.status}: {shorten(run.error or '')}")
        lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- csv


def csv_rows(runs: Sequence[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of summary.csv: raw values only, `None` where a run has none."""
    refs = find_references(runs)
    override_keys = sorted({k for r in runs for k in r.override_map})
    known = [*FOOTPRINT_KEYS, *METRIC_KEYS, "n_test", "tta", "tta_views", "resolution", "eval_precision"]
    extras = sorted({k for r in runs for k, v in r.metrics.items()
                     if k not in _SKIP_CSV and k not in known and not isinstance(v, dict | list)}
                    - {"data", "model", "method", "quant"})
    ref_keys = [*FOOTPRINT_KEYS, *METRIC_KEYS]
    columns = ["job", "status", "error", "run_dir", "overrides", *(f"override.{k}" for k in override_keys),
               "method", "model", "data", "quant", "prune_method", *TAU_KEYS, *known, *extras,
               "reference_source", *(f"reference.{k}" for k in ref_keys)]
    rows = []
    for run in runs:
        ref, source = refs.get(run.run_dir, ({}, None))
        prune = run.prune
        row: dict[str, Any] = {
            "job": run.job, "status": run.status, "error": run.error, "run_dir": str(run.run_dir),
            "overrides": " ".join(run.overrides),
            **{f"override.{k}": run.override_map.get(k) for k in override_keys},
            "method": run.method, "model": run.model, "data": run.data, "quant": run.quant,
            "prune_method": prune.get("method"), **{k: prune.get(k) for k in TAU_KEYS},
            **{k: run.metrics.get(k) for k in known}, "tta": run.tta, "n_test": run.n_test,
            "tta_views": run.tta_views, "resolution": run.resolution, "eval_precision": run.eval_precision,
            **{k: run.metrics.get(k) for k in extras},
            "reference_source": source, **{f"reference.{k}": ref.get(k) for k in ref_keys},
        }
        rows.append(row)
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


def plot_sweep_roc(runs: Sequence[RunRecord], path: Path) -> Path:
    """One ROC curve per ok run with predictions; the legend says which run and its AUROC."""
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.override_map)
            if _varying([r.override_map.get(k) for r in runs])]
    fig, ax = plt.subplots(figsize=(7, 6))
    plotted = 0
    for run in runs:
        pred = run.run_dir / PREDICTIONS_FILE
        if not run.ok or not pred.is_file():
            continue
        try:
            labels, probs = read_predictions(pred)
            fpr, tpr, _ = roc_curve(labels, probs)
            auroc = roc_auc_score(labels, probs)
        except (OSError, ValueError, KeyError):
            continue  # one unreadable file must not cost the whole figure
        label = f"{run.job}: {_legend_label(run, keys)} (AUROC {auroc:.4f})"
        ax.plot(fpr, tpr, linewidth=1.2, label=label)
        plotted += 1
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    synthetic = any(r.data == "synthetic" for r in runs)
    title = "Sweep ROC" + (f" ({SYNTHETIC_NOTE})" if synthetic else "")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    if plotted:
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no ok runs with predictions", ha="center", va="center")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def _legend_label(run: RunRecord, keys: Sequence[str]) -> str:
    """The overrides that tell this run apart; what it ran when the overrides do not (a single run)."""
    overrides = run.override_map
    parts = [f"{k}={overrides[k]}" for k in keys if k in overrides]
    return " ".join(parts) or " · ".join([_plain(run.method), _plain(run.quant), format_pruning(run.prune)])


# ---------------------------------------------------------------- entry points


STYLES = ("default", "reference")


def write_summary(runs: Sequence[RunRecord], out_dir: str | Path, style: str = "default",
                  baseline: str | Path | None = None) -> dict[str, Path]:
    """Write summary.csv, summary.md and roc.png into `out_dir`; returns their paths by kind.

    style: "default" (every run, changes against each run's own uncompressed model) or "reference" (the
    reference table's layout, changes against one `baseline` run; see pcamx.report.reference_table)."""
    from pcamx.report.reference_table import pick_baseline, reference_table

    out_dir = Path(out_dir)
    if (out_dir / METRICS_FILE).is_file():
        # A run directory has its own roc.png; the sweep figure must not replace it.
        raise ValueError(f"{out_dir} is a run directory; write the sweep summary elsewhere (--out)")
    if style not in STYLES:
        raise ValueError(f"unknown table style {style!r}; allowed: {', '.join(STYLES)}")
    if baseline is not None and style != "reference":
        raise ValueError("a baseline run only applies to --style reference")
    md = reference_table(runs, pick_baseline(runs, baseline)) if style == "reference" else markdown_table(runs)
    return {
        "csv": io.write_text(out_dir / "summary.csv", csv_text(runs)),
        "md": io.write_text(out_dir / "summary.md", md),
        "roc": plot_sweep_roc(runs, out_dir / "roc.png"),
    }


def summarize(dirs: Sequence[str | Path], out_dir: str | Path, style: str = "default",
              baseline: str | Path | None = None) -> tuple[list[RunRecord], dict[str, Path]]:
    """collect_runs + write_summary."""
    runs = collect_runs(dirs)
    return runs, write_summary(runs, out_dir, style, baseline)


def any_failed(runs: Iterable[RunRecord]) -> bool:
    return any(not r.ok for r in runs)
