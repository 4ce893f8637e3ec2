"""The results table in the reference layout (docs/reference.md): `python -m pcamx.report DIRS --style reference`.

Rows: uncompressed models, then compressed ones; full FT, LoRA, head-only; a model's `none (f32)` row before its
bf16 / int8 rows (method `-`). The reference's labels, `*(same τ)*` for a plan an earlier row used; percent changes
on Parameters, GFLOPs, Memory and AUROC only, against one baseline run (default: full FT, unquantized, f32).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pcamx.compress.quant import EvalPrecision
from pcamx.evaluation.metrics import METRIC_NAMES
from pcamx.report.format import VALUE_COLUMNS, format_change, format_interval, format_value, percent_change
from pcamx.report.runs import SIGNIFICANT, SYNTHETIC_NOTE, RunRecord, format_budget, md_escape, shorten
from pcamx.runtime.errors import UserError

COLUMNS = ("Method", "Quantization", *(header for _, header in VALUE_COLUMNS))
ALIGN = ("---", "---", "---", *("---:",) * (len(VALUE_COLUMNS) - 1))
CHANGE_KEYS = ("params", "gflops", "memory_mb", "auroc")
METHOD_ORDER = ("fullft", "lora", "head_only")
UNCOMPRESSED_LABELS = {"fullft": "Full fine‑tune (FT)", "head_only": "Linear probe (head-only)"}
COMPRESSED_LABELS = {"fullft": "Full FT", "lora": "LoRA", "head_only": "Head-only"}
STEP_LABELS = {"heads": "heads", "mlp": "MLP", "svd": "SVD", "blocks": "blocks"}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"up_proj", "down_proj"}


class BaselineError(UserError, ValueError):
    """The baseline run asked for is not among the runs or did not finish ok."""


def lora_label(config: dict[str, Any]) -> str:
    if not config.get("r"):
        return "LoRA"
    targets = set(config.get("targets") or ())
    if config.get("include_mlp"):
        targets |= MLP
    if targets == ATTENTION | MLP:
        scope = "attn+MLP"
    elif targets == ATTENTION:
        scope = "attn"
    else:
        scope = "+".join(sorted(targets))
    return f"LoRA (r={config['r']}; {scope} adapters)"


def compression_plan(run: RunRecord) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(steps in run order, their τ) from the run's prune entry, any form (sweep.PruneSummary)."""
    taus = run.plan.taus
    return tuple(s for s, _ in taus), tuple(t for _, t in taus)


def method_label(run: RunRecord, seen_plans: set) -> str:
    """`LoRA (r=8; attn+MLP adapters)`, `Full FT + compression *(heads+MLP+SVD, τ=[0.89, 0.975, 0.975])*`;
    a budget, criterion and scope join the plan where set: `*(heads+MLP+SVD, ≤60% GFLOPs, τ=0.931, activation)*`."""
    method = run.method or "?"
    if not run.compressed_model:
        if method == "lora":
            return lora_label(run.method_config)
        return UNCOMPRESSED_LABELS.get(method, method)
    plan = run.plan
    steps, taus = compression_plan(run)
    name = f"{COMPRESSED_LABELS.get(method, method)} + compression"
    if not steps and plan.budget is None and not plan.extras:
        return name
    if plan in seen_plans:
        return f"{name} *(same τ)*"
    seen_plans.add(plan)
    parts = ["+".join(STEP_LABELS.get(s, s) for s in steps) or str(plan.method)]
    parts += [format_budget(plan.budget)] if plan.budget is not None else []
    if taus:
        searched = plan.budget is not None and len(set(taus)) == 1  # the search's one τ for every step
        parts.append("τ=" + (f"{taus[0]:g}" if len(taus) == 1 or searched
                             else "[" + ", ".join(f"{t:g}" for t in taus) + "]"))
    return f"{name} *({', '.join([*parts, *plan.extras])})*"


def _precision_rank(run: RunRecord) -> int:
    # A model's rows: unquantized at f32, under autocast, then the quantized ones (EvalPrecision's order).
    order = list(EvalPrecision)
    return order.index(run.eval_precision) if run.eval_precision in order else len(order)


def _group_key(run: RunRecord) -> tuple:
    method = run.method or ""
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    plan = run.plan if run.compressed_model else None
    # A plan sorts by its steps and τ, then by what else it says (criterion, scope, budget).
    plan_key = (compression_plan(run), repr(plan)) if plan is not None else (((), ()), "")
    return (run.compressed_model, rank, method, plan_key, run.data or "", run.resolution or 0, run.tta_views or 0)


def order_rows(runs: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """Runs grouped by model (same method, compression, data, resolution, views), groups in table order,
    each group's rows by precision."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
    return [sorted(groups[key], key=_precision_rank) for key in sorted(groups)]


def pick_baseline(runs: Sequence[RunRecord], baseline_dir: str | Path | None = None) -> RunRecord | None:
    """The run every percentage is computed against: `baseline_dir`, else the first ok full-FT run
    that is neither compressed nor quantized and was evaluated in f32 (None when there is none)."""
    if baseline_dir is not None:
        wanted = Path(baseline_dir).resolve()
        for run in runs:
            if run.run_dir.resolve() == wanted:
                if not run.ok:
                    raise BaselineError(f"the baseline run {baseline_dir} did not finish ok ({run.status})")
                return run
        raise BaselineError(f"the baseline run {baseline_dir} is not among the reported runs; add its directory")
    for run in runs:
        if (run.ok and run.method == "fullft" and not run.compressed_model and run.quant == "none"
                and run.eval_precision == "fp32"):
            return run
    return None


def _measured(runs: Sequence[RunRecord]) -> tuple[str, list[tuple[str, str]]]:
    """(a sentence for what is the same in every row, extra columns for what is not)."""
    parts, extra = [], []
    for attr, title, text in (
        ("n_test", None, lambda v: f"test split n={v}"),
        ("tta_views", "TTA views",
         lambda v: "no TTA" if v == 1 else f"TTA: mean of softmax probabilities over {v} views"),
        ("resolution", "Resolution", lambda v: f"{v}×{v} px inputs"),
        ("data", None, lambda v: f"data: {v}"),
    ):
        values = {getattr(r, attr) for r in runs if getattr(r, attr) is not None}
        if len(values) == 1:
            parts.append(text(values.pop()))
        elif values and title:
            extra.append((title, attr))
        elif values:
            parts.append(f"{attr} differs between rows (see summary.csv)")
    return ", ".join(parts), extra


def reference_table(runs: Sequence[RunRecord], baseline: RunRecord | None, ci: bool = True) -> str:
    """summary.md in the reference layout; with `ci`, each metric with its 95% interval."""
    measured, extra = _measured(runs)
    lines = ["# Results", ""]
    if any(r.data == "synthetic" for r in runs):
        lines += [f"> **{SYNTHETIC_NOTE}.** These numbers describe the generated stand-in, not PatchCamelyon.", ""]
    if measured:
        lines += [f"Measured on: {measured}. The Quantization column gives the weights and the evaluation "
                  "precision of each row.", ""]
    if baseline is not None:
        lines += [f"Changes (↓/↑ %) on Parameters, GFLOPs, Memory and AUROC are against the "
                  f"{method_label(baseline, set())}, {baseline.quantization} run ({baseline.run_dir}).", ""]
    else:
        lines += ["No baseline run (full FT, unquantized, f32) among these runs: no changes shown; "
                  "pass --baseline RUN_DIR.", ""]
    if ci:
        lines += ["[lo, hi]: 95% bootstrap interval of the test metric (metrics.json → ci95, ci_method).", ""]
    if any(r.significant(m) for r in runs for m in METRIC_NAMES):
        lines += [f"{SIGNIFICANT}: differs from the same model uncompressed and in f32 (the paired 95% bootstrap "
                  "interval of the difference excludes 0; metrics.json → reference.paired).", ""]
    header = [*COLUMNS, *(title for title, _ in extra)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join((*ALIGN, *("---:",) * len(extra))) + " |")
    base = baseline.metrics if baseline is not None else {}
    seen_plans: set = set()
    sources = []
    for group in order_rows(runs):
        label = method_label(group[0], seen_plans)
        for i, run in enumerate(group):
            cells = [label if i == 0 else "-", run.quantization]
            for key, _ in VALUE_COLUMNS:
                value = run.metrics.get(key)
                text = format_value(key, value)
                if key in CHANGE_KEYS and run is not baseline and text != "—":
                    text += format_change(percent_change(value, base.get(key)))
                if key in METRIC_NAMES and run.significant(key):
                    text += SIGNIFICANT
                if ci and key in run.ci95:
                    text += f" {format_interval(key, run.ci95[key])}"
                cells.append(text)
            cells += [str(getattr(run, attr) or "—") for _, attr in extra]
            lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
            status = "" if run.ok else f" — **{run.status}**: {shorten(run.error or '')}"
            sources.append(f"- {label if i == 0 else '↳'} · {run.quantization}: `{run.run_dir}`{status}")
    lines += ["", "Run directories (raw numbers in summary.csv):", "", *sources]
    return "\n".join(lines) + "\n"
