"""frontier.png: what compression buys, test AUROC against GFLOPs, beside a sweep's summary.md.

One point per summary.md row with both numbers, one line per kind of compression (and per method, quantization
or resolution where the rows differ in them), joined in order of GFLOPs; error bars: the run's 95% interval, or ±
the sd over a seed group; stars: the uncompressed f32 references; rings: the Pareto-optimal rows (◆). Up and to
the left is better. `frontier_data` computes all of it; `plot_frontier` only draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pcamx.report.format import is_number  # noqa: E402
from pcamx.report.runs import (  # noqa: E402
    RunRecord,
    format_pruning,
    group_by_seed,
    pareto_rows,
    row_point,
    sweep_title,
)
from pcamx.runtime import disk  # noqa: E402

UNCOMPRESSED = "uncompressed"
MARKERS = "osD^vP<>Xph*"
ANNOTATE_AT_MOST = 24  # points; beyond that the τ labels would hide the figure
ERRORS_NOTE = "error bars: 95% bootstrap interval of the test AUROC (one run), ± sd over seeds (a seed group)"


@dataclass(frozen=True)
class Point:
    gflops: float
    auroc: float
    yerr: tuple[float, float] | None = None  # (below, above) the point
    note: str = ""  # the Pruning/τ text without method, criterion and scope: `τ=0.9`, `≤6 GFLOPs (τ=0.93)`
    pareto: bool = False


@dataclass(frozen=True)
class Series:
    label: str
    points: tuple[Point, ...]  # in order of GFLOPs


@dataclass(frozen=True)
class Frontier:
    series: tuple[Series, ...]
    uncompressed: tuple[Point, ...]  # the distinct reference models
    title: str

    @property
    def pareto(self) -> list[Point]:
        """The Pareto-optimal points, in order of GFLOPs."""
        return sorted((p for s in self.series for p in s.points if p.pareto), key=lambda p: (p.gflops, -p.auroc))


def _interval_err(value: float, interval: object) -> tuple[float, float] | None:
    if not (isinstance(interval, list | tuple) and len(interval) == 2 and all(is_number(v) for v in interval)):
        return None
    return max(value - interval[0], 0.0), max(interval[1] - value, 0.0)


def row_error(row: Sequence[RunRecord], auroc: float) -> tuple[float, float] | None:
    """± the sample sd over a seed group's AUROCs, or one run's 95% interval around `auroc`."""
    values = [r.metrics["auroc"] for r in row if is_number(r.metrics.get("auroc"))]
    if len(values) > 1:
        sd = math.sqrt(math.fsum((v - auroc) ** 2 for v in values) / (len(values) - 1))
        return sd, sd
    return _interval_err(auroc, row[0].ci95.get("auroc"))


def _series_parts(run: RunRecord) -> dict[str, str]:
    plan = run.plan
    return {"prune": plan.method if plan.pruned else "not pruned",
            "criterion": plan.criterion if plan.pruned else "", "scope": plan.scope if plan.pruned else "",
            "method": str(run.method), "quant": run.quantization,
            "resolution": f"{run.resolution} px" if run.resolution is not None else "? px"}


def series_label(parts: dict[str, str], varying: set[str]) -> str:
    """`heads (weight)`, `heads (activation, global)`, `not pruned`, then `· lora`, `· bf16`, `· 224 px` for
    what differs between the plotted rows."""
    inner = [parts["criterion"]] + ([parts["scope"]] if "scope" in varying and parts["scope"] else [])
    head = parts["prune"] + (f" ({', '.join(inner)})" if parts["criterion"] else "")
    return " · ".join([head, *(parts[k] for k in ("method", "quant", "resolution") if k in varying)])


def _note(run: RunRecord) -> str:
    """The point's τ (or budget and τ): the Pruning/τ text without the method, criterion and scope, which
    the series label gives."""
    if not run.plan.pruned:
        return ""
    return format_pruning(run.prune).split(" · ")[0].removeprefix(str(run.plan.method)).strip()


def _uncompressed(runs: Sequence[RunRecord]) -> tuple[Point, ...]:
    seen: dict[tuple[float, float], Point] = {}
    for run in runs:
        ref = run.metrics.get("reference") if run.ok else None
        if isinstance(ref, dict) and is_number(ref.get("gflops")) and is_number(ref.get("auroc")):
            key = (float(ref["gflops"]), float(ref["auroc"]))
            seen.setdefault(key, Point(*key, yerr=_interval_err(key[1], (ref.get("ci95") or {}).get("auroc"))))
    return tuple(sorted(seen.values(), key=lambda p: (p.gflops, p.auroc)))


def frontier_data(runs: Sequence[RunRecord]) -> Frontier | None:
    """The points, series and Pareto marks of frontier.png; None when no ok run has both GFLOPs and AUROC."""
    rows = group_by_seed(runs)
    plotted = [(row, point, optimal) for row, point, optimal in zip(rows, map(row_point, rows), pareto_rows(rows),
                                                                     strict=True) if point is not None]
    if not plotted:
        return None
    parts = [_series_parts(row[0]) for row, _, _ in plotted]
    varying = {k for k in ("method", "quant", "resolution") if len({p[k] for p in parts}) > 1}
    if len({p["scope"] for p in parts if p["scope"]}) > 1:
        varying.add("scope")
    series: dict[str, list[Point]] = {}
    for (row, (auroc, gflops), optimal), part in zip(plotted, parts, strict=True):
        series.setdefault(series_label(part, varying), []).append(
            Point(gflops, auroc, row_error(row, auroc), _note(row[0]), optimal))
    resolutions = {p["resolution"] for p in parts}
    what = "Test AUROC vs GFLOPs" + (f" at {resolutions.pop()}" if len(resolutions) == 1 else "")
    return Frontier(
        series=tuple(Series(label, tuple(sorted(points, key=lambda p: (p.gflops, p.auroc))))
                     for label, points in series.items()),
        uncompressed=_uncompressed([r for row, _, _ in plotted for r in row]),
        title=sweep_title(runs, what))


def _errorbars(ax, points: Sequence[Point], color) -> None:
    with_err = [p for p in points if p.yerr is not None]
    if with_err:
        ax.errorbar([p.gflops for p in with_err], [p.auroc for p in with_err],
                    yerr=np.array([[p.yerr[0] for p in with_err], [p.yerr[1] for p in with_err]]),
                    fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.8)


def plot_frontier(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Draw `frontier_data(runs)` into `path`; None (nothing written) when there is nothing to plot."""
    data = frontier_data(runs)
    if data is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 6))
    annotate = sum(len(s.points) for s in data.series) <= ANNOTATE_AT_MOST
    for i, series in enumerate(data.series):
        (line,) = ax.plot([p.gflops for p in series.points], [p.auroc for p in series.points],
                          marker=MARKERS[i % len(MARKERS)], linewidth=1.2, markersize=6, label=series.label)
        _errorbars(ax, series.points, line.get_color())
        for p in series.points if annotate else ():
            if p.note:
                ax.annotate(p.note, (p.gflops, p.auroc), xytext=(4, 4), textcoords="offset points", fontsize=6)
    if data.uncompressed:
        ax.scatter([p.gflops for p in data.uncompressed], [p.auroc for p in data.uncompressed], marker="*", s=180,
                   color="black", zorder=4, label=UNCOMPRESSED)
        _errorbars(ax, data.uncompressed, "black")
    pareto = data.pareto
    ax.plot([p.gflops for p in pareto], [p.auroc for p in pareto], linestyle="--", color="crimson", linewidth=0.8,
            zorder=1)
    ax.scatter([p.gflops for p in pareto], [p.auroc for p in pareto], s=230, facecolors="none",
               edgecolors="crimson", linewidths=1.5, zorder=5, label="Pareto-optimal")
    ax.set(xlabel="GFLOPs per image (at the run's resolution)", ylabel="Test AUROC", title=data.title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    errors = any(p.yerr for s in data.series for p in s.points) or any(p.yerr for p in data.uncompressed)
    fig.text(0.01, 0.01, (ERRORS_NOTE + "; " if errors else "") + "up and to the left is better", fontsize=7,
             color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    with disk.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
