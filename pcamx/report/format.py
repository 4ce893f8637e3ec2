"""How numbers appear in every table: values, relative changes, the Quantization label. One place, so the
printed run table, the sweep table and the reference-style table agree."""

from __future__ import annotations

import math
from typing import Any

from pcamx.compress.quant import EvalPrecision
from pcamx.evaluation.metrics import METRICS

FOOTPRINT_COLUMNS: tuple[tuple[str, str], ...] = (("params", "Parameters"), ("gflops", "GFLOPs"),
                                                  ("memory_mb", "Memory (MB)"))
# (metrics.json key, header) of every value column, in table order: footprint, then the metric registry.
VALUE_COLUMNS: tuple[tuple[str, str], ...] = (*FOOTPRINT_COLUMNS, *((m.name, m.header) for m in METRICS))
_DIGITS = {m.name: m.digits for m in METRICS}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def format_value(key: str, value: Any) -> str:
    """21.60M parameters, 8.67 GFLOPs, 86.5 MB, metrics to their registered digits (0.9800); two significant
    digits for the tiny test model's 0.0012 GFLOPs; "—" when there is no number."""
    if not is_number(value):
        return "—"
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if key in ("gflops", "memory_mb"):
        if value != 0 and abs(value) < 0.1:
            return f"{value:.2g}"
        return f"{value:.2f}" if key == "gflops" else f"{value:.1f}"
    if key in _DIGITS:
        return f"{value:.{_DIGITS[key]}f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_interval(key: str, interval: Any) -> str:
    """`[0.9731, 0.9760]` in the metric's digits; "—" without an interval."""
    if not (isinstance(interval, list | tuple) and len(interval) == 2 and all(is_number(v) for v in interval)):
        return "—"
    return f"[{format_value(key, interval[0])}, {format_value(key, interval[1])}]"


def format_mean_sd(key: str, values: list[Any]) -> str:
    """`0.9746 ± 0.0012` (sample standard deviation) over the numbers among `values`; one number as it is."""
    numbers = [v for v in values if is_number(v)]
    if len(numbers) < 2:
        return format_value(key, numbers[0] if numbers else None)
    mean = math.fsum(numbers) / len(numbers)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in numbers) / (len(numbers) - 1))
    return f"{format_value(key, mean)} ± {format_value(key, sd)}"


def percent_change(value: Any, reference: Any) -> float | None:
    """100 · (value − reference) / |reference|; None when either is missing or the reference is 0."""
    if not (is_number(value) and is_number(reference)) or reference == 0:
        return None
    return 100.0 * (value - reference) / abs(reference)


def format_change(pct: float | None) -> str:
    """` (↓7.0%)`; "" when there is no change to show or it rounds to 0.0%. The arrow is the direction
    only, not whether it is better (↓ is good for ECE, bad for AUROC)."""
    if pct is None or round(pct, 1) == 0:
        return ""
    return f" ({'↑' if pct > 0 else '↓'}{abs(pct):.1f}%)"


def format_cell(key: str, value: Any, pct: float | None = None) -> str:
    text = format_value(key, value)
    return text + format_change(pct) if text != "—" else text


def quantization_label(quant: str | None, eval_precision: str | None) -> str:
    """The Quantization column: `EvalPrecision.label` (`none (f32)`, `int8 (dynamic)`, …); for a run that never
    evaluated, what its config asked for."""
    if quant is None:
        return "—"
    if eval_precision in set(EvalPrecision):
        return EvalPrecision(eval_precision).label
    return EvalPrecision.FP32.label if quant == "none" else quant


def format_table(metrics: dict[str, Any]) -> str:
    """The table a run prints at its end: every metric of the registry with its 95% interval, then footprint,
    speed and how it was measured."""
    ci = metrics.get("ci95") or {}
    how = {"slide": f"{metrics.get('ci_slides')} slides resampled", "patch": "patches resampled"}
    rows = [f"| metric | value | 95% interval ({how.get(metrics.get('ci_method'), 'none')}) |", "| --- | --- | --- |"]
    rows += [f"| {m.header} | {format_value(m.name, metrics.get(m.name))} | {format_interval(m.name, ci.get(m.name))} |"
             for m in METRICS]
    for key in ("params", "gflops", "memory_mb", "latency_ms_b1", "throughput_ips", "n_test", "tta_views",
                "resolution", "train_precision", "eval_precision", "data"):
        value = metrics.get(key)
        shown = format_value(key, value) if key in ("params", "gflops", "memory_mb") else value
        rows.append(f"| {key} | {shown} | |")
    if "operating_points" in metrics:
        t = metrics["operating_points"]["thresholds"]["val95spec"]
        rows.append(f"| Sens / Spec at the val95spec threshold (chosen on valid) | "
                    f"{metrics['sens_at_val95spec_threshold']:.4f} / {metrics['spec_at_val95spec_threshold']:.4f} | "
                    f"p >= {t:.4g} |")
    if "calibration" in metrics:
        c = metrics["calibration"]
        rows.append(f"| temperature (fitted on valid) | {c['temperature']:.4g} | ECE {c['before']['ece']:.4f} → "
                    f"{c['after']['ece']:.4f}, NLL {c['before']['nll']:.4f} → {c['after']['nll']:.4f} |")
    return "\n".join(rows)
